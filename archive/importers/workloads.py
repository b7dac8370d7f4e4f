"""Import public workload traces into archive datasets: ``archive import KIND SRC DEST``.

=========  ====================================================================  ===========
kind       source columns                                                        licence
=========  ====================================================================  ===========
azure      ``TIMESTAMP, ContextTokens, GeneratedTokens`` (Azure LLM inference     CC-BY-4.0
           2023, conversation and code; Patel et al., Splitwise, ISCA 2024)
mooncake   JSON Lines ``timestamp`` (ms), ``input_length``, ``output_length``,    Apache-2.0
           ``hash_ids`` (512-token blocks; Qin et al., Mooncake, FAST 2025)
burstgpt   ``Timestamp, Model, Request tokens, Response tokens, Total tokens,    CC-BY-4.0
           Log Type`` (Wang et al., BurstGPT, KDD 2025)
marconi    ``session_id, turn_id, ts, num_input_tokens, num_output_tokens,      as its source
           input_tokens, output_tokens`` (the Kavier prototype's format, the
           aggregated Marconi traces of Pan et al., MLSys 2025)
=========  ====================================================================  ===========

Sources are read in chunks (a multi-gigabyte BurstGPT file never sits in memory) and written
chunk by chunk to ``workload.parquet`` (schema :data:`archive.schema.WORKLOAD`), with a
progress bar on a terminal. Every row is checked: token counts must be non-negative integers,
timestamps parseable and non-negative (relative timestamps are kept; absolute ones count from
the first row's), lists lists of non-negative integers of the right length, and a session's
turns increasing. A bad row stops the import with an error
naming file, line and field; with ``drop_invalid`` it is dropped instead and counted per
reason in ``dataset.json``. Nothing is coerced silently.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from archive.cards import finish
from archive.errors import InputError
from archive.schema import WORKLOAD
from archive.traces import MAX_TOKENS, content_lengths, id_list, turns_not_increasing


@dataclass(frozen=True)
class Source:
    """How a public trace maps onto the workload table."""

    input_column: str
    output_column: str
    time_column: str | None
    time_kind: str | None          # "datetime", "seconds" or "milliseconds"
    content_column: str | None = None
    block_size: int | None = None
    session_column: str | None = None
    turn_column: str | None = None
    jsonl: bool = False
    title: str = ""
    licence: str = ""
    source: str = ""
    citation: str = ""
    creators: tuple[str, ...] = ()


SOURCES = {
    "azure": Source("ContextTokens", "GeneratedTokens", "TIMESTAMP", "datetime",
                    title="Azure LLM inference trace 2023", licence="CC-BY-4.0",
                    source="https://github.com/Azure/AzurePublicDataset",
                    citation="Patel et al., Splitwise: Efficient generative LLM inference using "
                             "phase splitting, ISCA 2024", creators=("Microsoft Azure",)),
    "mooncake": Source("input_length", "output_length", "timestamp", "milliseconds",
                       content_column="hash_ids", block_size=512, jsonl=True,
                       title="Mooncake trace (FAST 2025)", licence="Apache-2.0",
                       source="https://github.com/kvcache-ai/Mooncake, FAST25-release/traces/",
                       citation="Qin et al., Mooncake: Trading More Storage for Less "
                                "Computation, USENIX FAST 2025", creators=("kvcache-ai",)),
    "burstgpt": Source("Request tokens", "Response tokens", "Timestamp", "seconds",
                       title="BurstGPT trace", licence="CC-BY-4.0",
                       source="https://github.com/HPMLL/BurstGPT",
                       citation="Wang et al., BurstGPT: A Real-World Workload Dataset to "
                                "Optimize LLM Serving Systems, KDD 2025", creators=("HPMLL",)),
    "marconi": Source("num_input_tokens", "num_output_tokens", "ts", "seconds",
                      content_column="input_tokens", session_column="session_id",
                      turn_column="turn_id", title="Marconi-format workload (Kavier prototype)",
                      licence="as its source", source="Marconi traces (Pan et al.)",
                      citation="Pan et al., Marconi: Prefix Caching for the Era of Hybrid "
                               "LLMs, MLSys 2025", creators=("see source",)),
}
"""The importable kinds."""


@dataclass
class _State:
    """What the import carries from chunk to chunk."""

    origin: pd.Timestamp | float | None = None
    last_turn: dict | None = None
    dropped: dict | None = None
    rows: int = 0


def _chunks(path: Path, spec: Source, chunk_rows: int) -> Iterator[pd.DataFrame]:
    try:
        if spec.jsonl:
            reader = pd.read_json(path, lines=True, dtype=False, chunksize=chunk_rows)
        else:
            reader = pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=chunk_rows)
        with reader:
            yield from reader
    except FileNotFoundError:
        raise InputError("no such file", path=path) from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read: {str(exc).splitlines()[0]}", path=path) from None


def _integers(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Token counts and which are bad: missing, negative, fractional, infinite or above
    :data:`archive.traces.MAX_TOKENS` (the same rule as the trace readers)."""
    numbers = pd.to_numeric(values, errors="coerce").astype(np.float64)
    bad = (numbers.isna() | (numbers < 0) | (numbers > MAX_TOKENS)
           | (numbers != numbers.round())).to_numpy(copy=True)
    return np.where(bad, 0, numbers.fillna(0)).astype(np.int64), bad


def _times(values: pd.Series, kind: str, state: _State) -> tuple[np.ndarray, np.ndarray]:
    if kind == "datetime":
        stamps = pd.to_datetime(values, format="ISO8601", errors="coerce")
        if state.origin is None and stamps.notna().any():
            state.origin = stamps[stamps.notna()].iloc[0]
        seconds = (stamps - state.origin).dt.total_seconds()
    else:                    # already relative to the trace's start: kept as they are
        seconds = pd.to_numeric(values, errors="coerce") / (
            1000.0 if kind == "milliseconds" else 1.0)
        state.origin = "the trace's own time zero"
    bad = (seconds.isna() | (seconds < 0) | ~np.isfinite(seconds.astype(np.float64))
           ).to_numpy(copy=True)
    return np.where(bad, 0.0, seconds.fillna(0.0)), bad


def _lists(values: pd.Series) -> tuple[list, np.ndarray]:
    out = [id_list(value) for value in values]
    return out, np.array([v is None for v in out], bool)


def _normalize(raw: pd.DataFrame, spec: Source, path: Path, first_line: int, state: _State,
               drop_invalid: bool) -> pa.Table:
    """One source chunk as a workload table, its bad rows rejected or dropped."""
    missing = [c for c in (spec.input_column, spec.output_column, spec.time_column,
                           spec.content_column, spec.session_column, spec.turn_column)
               if c and c not in raw.columns]
    if missing:
        raise InputError(f"missing column(s) {missing}; found {list(raw.columns)}", path=path)
    problems = {}                                   # field -> bad mask
    n_in, problems[spec.input_column] = _integers(raw[spec.input_column])
    n_out, problems[spec.output_column] = _integers(raw[spec.output_column])
    arrival, problems[spec.time_column] = _times(raw[spec.time_column], spec.time_kind, state)
    columns = {"arrival_s": arrival, "session_id": None, "turn_id": None,
               "n_input_tokens": n_in, "n_output_tokens": n_out,
               "input_tokens": None, "hash_ids": None}
    if spec.content_column:
        lists, problems[spec.content_column] = _lists(raw[spec.content_column])
        lengths = np.array([len(v) if v is not None else -1 for v in lists])
        problems[spec.content_column] |= lengths != content_lengths(n_in, spec.block_size)
        columns["input_tokens" if spec.block_size is None else "hash_ids"] = lists
    if spec.session_column:
        sessions = raw[spec.session_column].astype(str).to_numpy()
        turns, problems[spec.turn_column] = _integers(raw[spec.turn_column])
        problems[spec.turn_column] |= turns_not_increasing(sessions, turns, state.last_turn)
        columns["session_id"], columns["turn_id"] = sessions, turns.astype(np.int32)
    bad = np.zeros(len(raw), bool)
    for field, mask in problems.items():
        if not mask.any():
            continue
        if not drop_invalid:
            i = int(np.argmax(mask))
            value = raw[field].iloc[i]
            raise InputError(f"invalid value {str(value)[:40]!r} (use --drop-invalid to drop "
                             f"such rows)", path=path, row=first_line + i, field=field)
        reason = f"invalid {field}"
        state.dropped[reason] = state.dropped.get(reason, 0) + int((mask & ~bad).sum())
        bad |= mask
    keep = ~bad
    arrays = []
    for field in WORKLOAD:
        values = columns[field.name]
        if values is None:
            arrays.append(pa.nulls(int(keep.sum()), field.type))
        elif isinstance(values, list):
            arrays.append(pa.array([v for v, k in zip(values, keep, strict=True) if k],
                                   field.type))
        else:
            arrays.append(pa.array(np.asarray(values)[keep], field.type))
    return pa.Table.from_arrays(arrays, schema=WORKLOAD)


def import_workload(kind: str, src: str | Path, dest: str | Path, drop_invalid: bool = False,
                    name: str | None = None, chunk_rows: int = 100_000) -> dict:
    """Import a public trace into an archive dataset folder ``dest``.

    Writes ``workload.parquet`` chunk by chunk (as ``.partial`` until complete), then
    ``dataset.json`` and the ``README.md`` card; returns the metadata.

    Raises
    ------
    InputError
        Unknown kind, unreadable source, missing columns, a bad row (without
        ``drop_invalid``), or no valid rows.
    """
    if kind not in SOURCES:
        raise InputError(f"unknown kind '{kind}'; known: {', '.join(SOURCES)}, carbon")
    spec, src, dest = SOURCES[kind], Path(src), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    state = _State(last_turn={}, dropped={})
    schema = WORKLOAD.with_metadata({**WORKLOAD.metadata, b"hash_block_size": str(
        spec.block_size or "").encode()})
    table_path = dest / "workload.parquet"
    partial = table_path.with_suffix(".parquet.partial")
    first_line = 1 if spec.jsonl else 2
    try:
        with pq.ParquetWriter(partial, schema) as writer, tqdm(
                unit="rows", disable=None, delay=2.0, desc=f"import {kind}") as bar:
            for raw in _chunks(src, spec, chunk_rows):
                table = _normalize(raw, spec, src, first_line, state, drop_invalid)
                writer.write_table(table.replace_schema_metadata(schema.metadata))
                first_line += len(raw)
                state.rows += table.num_rows
                bar.update(len(raw))
        if state.rows == 0:
            raise InputError("no valid rows", path=src)
        partial.replace(table_path)
    finally:
        partial.unlink(missing_ok=True)
    meta = {"name": name or dest.name, "title": spec.title, "kind": "workload",
            "version": "1.0.0", "main_table": "workload.parquet", "files": ["workload.parquet"],
            "description": f"{spec.title}, imported from {src.name} by `archive import {kind}`.",
            "creators": list(spec.creators), "licence": spec.licence, "source": spec.source,
            "citation": spec.citation, "time_origin": str(state.origin),
            "dropped_rows": state.dropped}
    if spec.block_size:
        meta["hash_block_size"] = spec.block_size
    return finish(dest, meta)


KEPT_KEYS = ("title", "description", "creators", "licence", "source", "citation", "notes",
             "version")
"""Hand-written ``dataset.json`` keys a rebuild keeps."""


def rebuild(dataset_dir: str | Path, kind: str, raw: str) -> Path:
    """Re-import a bundled dataset from its raw file ``raw`` (kept beside the table), keeping
    its hand-written metadata; returns the table's path."""
    dataset_dir = Path(dataset_dir)
    before = json.loads((dataset_dir / "dataset.json").read_text())
    meta = import_workload(kind, dataset_dir / raw, dataset_dir, name=dataset_dir.name)
    meta.update({k: before[k] for k in KEPT_KEYS if k in before})
    meta["files"] = ["workload.parquet", raw]
    meta.pop("created", None)
    finish(dataset_dir, meta)
    return dataset_dir / "workload.parquet"
