"""Read workload traces (what to simulate) from CSV, Parquet or JSON Lines.

Recognized layouts, by their columns:

* the thesis's ``num_input_tokens, num_output_tokens`` (Kavier prototype, Table 5.1), with
  ``ts`` (seconds) when present;
* the archive's own ``n_input_tokens, n_output_tokens`` (workload or measurement tables),
  with ``arrival_s`` when present;
* the Azure LLM inference 2023 trace ``TIMESTAMP, ContextTokens, GeneratedTokens``, whose
  timestamps become ``arrival_s`` relative to the first request;
* Marconi's ``session_id, turn_id, ts, num_in_t, num_out_t, input_tokens, output_tokens``
  (thesis Table 6.4; ``ts`` in seconds);
* Mooncake's JSON Lines ``timestamp`` (ms), ``input_length``, ``output_length``, ``hash_ids``.

Besides the counts, a trace may carry what the prompt *is*, which prefix caching needs:

* ``input_tokens``: the prompt's token ids, a Parquet ``list<int>`` column, a JSON list in
  JSON Lines, or a JSON-string column in CSV (the prototype's form ``"[1, 8853, ...]"``);
* ``hash_ids``: one id per block of ``block_size`` prompt tokens, each naming the block *and
  everything before it* (Mooncake's remapped prefix-block hashes; block size 512 there; an
  archive workload table states it in its schema metadata ``hash_block_size``).

A ``session_id`` column (conversation or user) is kept for session-scoped caches.

A source is a file, a dataset folder, or the name of a bundled workload dataset
(``archive.list_datasets()``).
Every value is checked; the first bad one raises :class:`~archive.errors.InputError` naming
file, line and field. Nothing is coerced silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from archive.arrow import from_numpy, to_numpy
from archive.arrow import table as arrow_table
from archive.errors import InputError, first_bad, shown

if TYPE_CHECKING:
    import pandas as pd

_LAYOUTS = [
    # (input column, output column, timestamp column or None, timestamp kind)
    ("num_input_tokens", "num_output_tokens", "ts", "seconds"),
    ("n_input_tokens", "n_output_tokens", "arrival_s", "seconds"),
    ("ContextTokens", "GeneratedTokens", "TIMESTAMP", "datetime"),
    ("num_in_t", "num_out_t", "ts", "seconds"),
    ("input_length", "output_length", "timestamp", "milliseconds"),
]
_CONTENT_COLUMNS = ("input_tokens", "hash_ids")
MOONCAKE_BLOCK_SIZE = 512
"""Tokens per ``hash_ids`` block in the Mooncake traces (kvcache-ai/Mooncake, FAST25-release)."""


@dataclass(frozen=True)
class PromptContent:
    """What each prompt holds, as one flat array plus offsets (a list column without Python
    objects per row).

    Attributes
    ----------
    kind : {"tokens", "hashes"}
        Token ids, or prefix-block hash ids.
    offsets : ndarray of int64, shape (n_requests + 1,)
        Request ``i`` owns ``values[offsets[i]:offsets[i + 1]]``.
    values : ndarray of int64
    block_size : int or None
        Tokens per block for ``hashes`` (None when the trace does not say).
    """

    kind: str
    offsets: np.ndarray
    values: np.ndarray
    block_size: int | None = None

    def row(self, i: int) -> np.ndarray:
        """Values of request ``i``."""
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        """Number of values per request."""
        return np.diff(self.offsets)


@dataclass(frozen=True)
class Workload:
    """A workload trace in archive form.

    Attributes
    ----------
    table : pyarrow.Table
        One row per request, in trace order: ``n_input_tokens`` and ``n_output_tokens``
        (int64), and when the trace has them ``arrival_s`` (float64, seconds since the first
        request) and ``session_id`` (int64 or string).
    content : PromptContent or None
        Token ids or prefix-block hashes per request, when the trace carries them.
    source : str
        The file it was read from.
    """

    table: pa.Table
    content: PromptContent | None
    source: str

    @classmethod
    def from_frame(cls, requests: pd.DataFrame, content: PromptContent | None,
                   source: str) -> Workload:
        """A workload from a pandas DataFrame of the same columns as :attr:`table`."""
        return cls(pa.Table.from_pandas(requests, preserve_index=False), content, source)

    @cached_property
    def requests(self) -> pd.DataFrame:
        """:attr:`table` as a pandas DataFrame (converted once, on first use)."""
        return self.table.to_pandas()

    def session_ids(self) -> np.ndarray | None:
        """Each request's ``session_id`` (what a session-scoped prefix cache keys on), or None
        when the trace has no sessions."""
        if "session_id" not in self.table.column_names:
            return None
        return to_numpy(self.table.column("session_id"))


def _read_table(path: Path) -> tuple[list[str], Callable[[str], np.ndarray], int,
                                     pa.Table | None]:
    """The file's column names, a function giving a column as a numpy array (native types; a
    CSV column with any non-numeric cell stays text, so that a bad value is reported as
    written), the line number of its first data row (2 for CSV, below the header; 1
    otherwise), and for Parquet the Arrow table (list columns are read from it without Python
    objects).

    Parquet and CSV are read with pyarrow straight into numpy (:mod:`archive.arrow`), without
    importing pandas, which reads JSON Lines, and CSV files whose column types pyarrow cannot
    settle on (see :func:`_read_csv`).
    """
    suffix = path.suffix.lower()
    kind = {".parquet": "Parquet", ".pq": "Parquet", ".jsonl": "JSON Lines"}.get(suffix, "CSV")
    try:
        if kind == "Parquet":
            table = pq.ParquetFile(path).read()
            _unique_columns(table.column_names, path)
            return table.column_names, lambda c: to_numpy(table.column(c)), 1, table
        if kind == "CSV" and (csv := _read_csv(path)) is not None:
            _unique_columns(csv.column_names, path)
            return csv.column_names, lambda c: to_numpy(csv.column(c)), 2, None
        import pandas as pd

        if kind == "JSON Lines":
            try:
                df, first_line = pd.read_json(path, lines=True, dtype=False), 1
            except (ValueError, TypeError) as exc:
                _check_json_lines(path)          # names the bad line (pandas gives a byte)
                raise ValueError(str(exc)) from None
        else:
            df, first_line = pd.read_csv(path, keep_default_na=False), 2
        return list(df.columns), lambda c: df[c].to_numpy(), first_line, None
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError("no such file", path=path) from None
    except (OSError, ValueError, pa.ArrowException, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read as {kind}: {str(exc).splitlines()[0]}",
                         path=path) from None


def _unique_columns(names: list[str], path: Path) -> None:
    """Raise :class:`InputError` for a column name that appears more than once."""
    seen = set()
    for name in names:
        if name in seen:
            raise InputError(f"column appears {names.count(name)} times", path=path,
                             field=name)
        seen.add(name)


def _check_json_lines(path: Path) -> None:
    """Raise :class:`InputError` naming the first line that is not one JSON object (pandas
    reports a byte position, or fails with a TypeError on a line that is a list); called only
    once pandas has failed."""
    import json

    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"not JSON: {exc.msg} (column {exc.colno})", path=path,
                                 row=number) from None
            if not isinstance(value, dict):
                raise InputError("expected one JSON object per line", path=path, row=number)


def _read_csv(path: Path) -> pa.Table | None:
    """The CSV file as pyarrow reads it, every cell as written (no cell is taken for a missing
    value), or None when pyarrow cannot read it: a column whose type, inferred from the first
    block, does not hold further down, or a malformed file. pandas then reads it, keeping such
    columns as text, so that the bad cell is reported by row, or says what is malformed."""
    options = pa_csv.ConvertOptions(null_values=[], strings_can_be_null=False)
    try:
        return pa_csv.read_csv(path, convert_options=options)
    except pa.ArrowInvalid:
        return None


def _layout(columns, path: Path) -> tuple[str | None, str | None, str | None, str | None]:
    for n_in, n_out, ts, kind in _LAYOUTS:
        if n_in in columns and n_out in columns:
            return n_in, n_out, (ts if ts in columns else None), kind
    if "input_tokens" in columns:
        for n_out in ("num_output_tokens", "n_output_tokens", "num_out_t", "output_length"):
            if n_out in columns:
                return None, n_out, None, None
    wanted = " or ".join(f"({a}, {b})" for a, b, _, _ in _LAYOUTS)
    raise InputError(f"missing token columns: expected {wanted}; found {list(columns)}",
                     path=path)


def _numbers(values: np.ndarray) -> np.ndarray:
    """``values`` as float64, NaN where a cell is missing or not a number (text columns, as
    pandas reads a CSV column holding any non-numeric cell, go through pandas' parser; a
    boolean, which pandas would read as 0 or 1, is not a number)."""
    if values.dtype.kind in "iuf":
        return values.astype(np.float64)
    if values.dtype.kind == "b":
        return np.full(values.shape, np.nan)
    import pandas as pd

    cells = pd.Series(values)
    cells = cells.mask(cells.map(lambda v: isinstance(v, bool | np.bool_)))
    return pd.to_numeric(cells, errors="coerce").to_numpy(np.float64)


MAX_TOKENS = 100_000_000
"""Largest token count a request may have (100 M: 100× the longest context of any model in
the library); beyond it a value is a unit or data error, and int64 arithmetic on it (KV bytes,
FLOPs) would overflow or exhaust memory."""


def token_column(values: np.ndarray, path: Path, column: str, first_line: int) -> np.ndarray:
    """Validate a token-count column: integers in ``[0, MAX_TOKENS]`` only, as int64.

    Raises
    ------
    InputError
        At the first value that is missing, not a number, negative, fractional, infinite or
        larger than :data:`MAX_TOKENS`.
    """
    if values.dtype.kind in "iu":
        with np.errstate(invalid="ignore"):
            bad = (values < 0) | (values > MAX_TOKENS)      # compared in the stored type
        numbers = values
    else:
        numbers = _numbers(values)
        with np.errstate(invalid="ignore"):
            bad = ~((numbers >= 0) & (numbers <= MAX_TOKENS)) | (numbers != np.round(numbers))
    if bad.any():
        i = first_bad(bad)
        raise InputError(f"expected an integer token count from 0 to {MAX_TOKENS:,}, got "
                         f"{shown(values[i])}", path=path, row=i + first_line, field=column)
    return numbers.astype(np.int64)


def _arrivals(values: np.ndarray, kind: str, path: Path, column: str,
              first_line: int) -> np.ndarray:
    """Arrival times in seconds since the first request, float64."""
    if kind == "datetime":
        import pandas as pd

        stamps = pd.to_datetime(pd.Series(values), format="ISO8601", errors="coerce")
        bad = stamps.isna()
        if bad.any():
            i = first_bad(bad)
            raise InputError(f"unparsable timestamp {shown(values[i])}", path=path,
                             row=i + first_line, field=column)
        return (stamps - stamps.min()).dt.total_seconds().to_numpy(np.float64)
    seconds = _numbers(values)
    with np.errstate(invalid="ignore"):
        bad = ~((seconds >= 0) & np.isfinite(seconds))
    if bad.any():
        i = first_bad(bad)
        raise InputError(f"expected a finite, non-negative number of {kind}, got "
                         f"{shown(values[i])}", path=path, row=i + first_line, field=column)
    return seconds / (1000.0 if kind == "milliseconds" else 1.0)


def _arrow_lists(table: pa.Table, column: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and values of a Parquet list column, checked."""
    array = table.column(column).combine_chunks()
    if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)) or not (
            pa.types.is_integer(array.type.value_type)):
        raise InputError(f"expected a list of integers per row, found type {array.type}",
                         path=path, field=column)
    if array.null_count:
        row = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError("missing list", path=path, row=row + 1, field=column)
    offsets = to_numpy(array.offsets).astype(np.int64)
    values = to_numpy(array.flatten()).astype(np.int64)
    offsets -= offsets[0]
    if values.size and values.min() < 0:
        where = int(np.searchsorted(offsets, int(np.argmax(values < 0)), side="right")) - 1
        raise InputError("negative id in list", path=path, row=where + 1, field=column)
    return offsets, values


def id_list(value) -> list[int] | None:
    """``value`` as a list of non-negative integer ids (a list, or a JSON string of one, as
    the prototype's CSVs hold), or None when it is not one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return value
    return None


def _python_lists(values: np.ndarray, path: Path, column: str,
                  first_line: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and values of a column of lists, or of JSON-string lists (CSV), checked."""
    lists = []
    for i, value in enumerate(values):
        parsed = id_list(value)
        if parsed is None:
            raise InputError(f"expected a list of non-negative integers, got "
                             f"{str(value)[:40]!r}", path=path, row=i + first_line,
                             field=column)
        lists.append(parsed)
    lengths = np.fromiter((len(v) for v in lists), np.int64, len(lists))
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    flat = np.fromiter((v for row in lists for v in row), np.int64, int(offsets[-1]))
    return offsets, flat


def _content(column_of: Callable[[str], np.ndarray], table: pa.Table | None,
             names: list[str], path: Path, first_line: int) -> PromptContent | None:
    present = [c for c in _CONTENT_COLUMNS if c in names and not (
        table.column(c).null_count == table.num_rows if table is not None
        else _all_empty(column_of(c)))]
    if not present:
        return None
    column = present[0]
    if table is not None:
        offsets, values = _arrow_lists(table, column, path)
    else:
        offsets, values = _python_lists(column_of(column), path, column, first_line)
    kind = "tokens" if column == "input_tokens" else "hashes"
    block = MOONCAKE_BLOCK_SIZE if "input_length" in names and kind == "hashes" else None
    stored = (table.schema.metadata or {}).get(b"hash_block_size") if table is not None else None
    if kind == "hashes" and stored:
        block = int(stored)
    return PromptContent(kind, offsets, values, block)


def content_lengths(n_in: np.ndarray, block_size: int | None) -> np.ndarray:
    """How many values a request's content list must hold: one token id per input token
    (``block_size`` None), or one hash id per block, the last one possibly partial."""
    return n_in if block_size is None else -(-n_in // block_size)


def turns_not_increasing(sessions, turns, last_turn: dict) -> np.ndarray:
    """Mask of the rows whose ``turn_id`` is not above their session's previous one.

    ``last_turn`` (session → highest turn so far) carries the state across chunks and is
    updated; rows with a missing session or turn are not checked."""
    bad = np.zeros(len(sessions), bool)
    for i, (session, turn) in enumerate(zip(sessions, turns, strict=True)):
        if session is None or turn is None:
            continue
        previous = last_turn.get(session, -1)
        bad[i] = turn <= previous
        last_turn[session] = max(turn, previous)
    return bad


def _check_lengths(n_in: np.ndarray, content: PromptContent, path: Path, first_line: int,
                   column: str) -> None:
    lengths = content.lengths()
    if content.kind == "tokens":
        bad, what = lengths != content_lengths(n_in, None), "token ids"
    elif content.block_size:
        bad = lengths != content_lengths(n_in, content.block_size)
        what = f"hash ids (one per {content.block_size}-token block)"
    else:
        return
    if bad.any():
        i = first_bad(bad)
        raise InputError(f"{lengths[i]} {what} for {n_in[i]} input tokens", path=path,
                         row=i + first_line, field=column)


def read_trace(source: str | Path) -> Workload:
    """Read a workload trace: request sizes, arrivals, sessions and prompt content.

    Parameters
    ----------
    source : str or Path
        CSV, Parquet or JSON Lines file, or a bundled workload dataset name.

    Returns
    -------
    Workload

    Raises
    ------
    InputError
        Unreadable file, missing columns, bad token counts, timestamps or lists, a token list
        whose length differs from the input token count, or an empty trace.
    """
    from archive.datasets import resolve

    path = resolve(source)
    names, column_of, first_line, table = _read_table(path)
    n_in, n_out, ts, kind = _layout(names, path)
    outputs = column_of(n_out)
    if len(outputs) == 0:
        raise InputError("the trace has no requests", path=path)
    content = _content(column_of, table, names, path, first_line)
    if n_in is None:
        n_in = "input_tokens"
        inputs = content.lengths()
    else:
        inputs = token_column(column_of(n_in), path, n_in, first_line)
    if content is not None:
        column = "input_tokens" if content.kind == "tokens" else "hash_ids"
        _check_lengths(inputs, content, path, first_line, column)
    out = {} if ts is None else {"arrival_s": _arrivals(column_of(ts), kind, path, ts,
                                                        first_line)}
    out["n_input_tokens"] = inputs.astype(np.int64)
    out["n_output_tokens"] = token_column(outputs, path, n_out, first_line)
    if "session_id" in names:
        sessions = (table.column("session_id") if table is not None
                    else _session_ids(column_of("session_id"), path))
        if sessions.null_count < len(sessions):
            out["session_id"] = sessions
    return Workload(arrow_table(out), content, str(path))


def _all_empty(values: np.ndarray) -> bool:
    """Whether every cell of a text file's column is empty (as a CSV writes a missing value)."""
    return values.dtype.kind == "O" and all(v is None or v == "" for v in values)


def _session_ids(values: np.ndarray, path: Path) -> pa.Array:
    """A text file's session ids as an Arrow array (empty cells as nulls)."""
    if values.dtype.kind in "iu":
        return from_numpy(values)
    if values.dtype.kind == "O":
        values = np.where(values == "", None, values)
    try:
        return pa.array(values, from_pandas=True)
    except pa.ArrowException:
        raise InputError("session ids mix types (numbers and text)", path=path,
                         field="session_id") from None


def read_workload(source: str | Path) -> pd.DataFrame:
    """The request table of :func:`read_trace` (sizes, arrivals, sessions; no content), as a
    pandas DataFrame."""
    return read_trace(source).requests
