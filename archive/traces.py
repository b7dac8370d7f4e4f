"""Read workload traces (what to simulate) from CSV or Parquet into the workload table.

Recognized layouts, by their columns:

* the thesis's ``num_input_tokens, num_output_tokens`` (Kavier prototype, Table 5.1);
* the archive's own ``n_input_tokens, n_output_tokens`` (workload or measurement tables),
  with ``arrival_s`` when present;
* the Azure LLM inference 2023 trace ``TIMESTAMP, ContextTokens, GeneratedTokens``, whose
  timestamps become ``arrival_s`` relative to the first request.

A source is a path, or the name of a bundled workload dataset (``archive.list_datasets()``).
Every value is checked; the first bad one raises :class:`~archive.errors.InputError` naming
file, line and field. Nothing is coerced silently.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from archive.errors import InputError, first_bad

_LAYOUTS = [
    # (input column, output column, timestamp column or None, timestamp kind)
    ("num_input_tokens", "num_output_tokens", None, None),
    ("n_input_tokens", "n_output_tokens", "arrival_s", "seconds"),
    ("ContextTokens", "GeneratedTokens", "TIMESTAMP", "datetime"),
]


def _read_table(path: Path) -> tuple[pd.DataFrame, int]:
    """The file as a DataFrame of strings (CSV) or native types (Parquet), and the line number
    of its first data row (2 for CSV, below the header; 1 for Parquet rows)."""
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pq.read_table(path).to_pandas(), 1
        return pd.read_csv(path, dtype=str, keep_default_na=False), 2
    except FileNotFoundError:
        raise InputError("no such file", path=path) from None
    except (OSError, pa.ArrowException, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read as {'Parquet' if path.suffix == '.parquet' else 'CSV'}: "
                         f"{str(exc).splitlines()[0]}", path=path) from None


def _layout(df: pd.DataFrame, path: Path) -> tuple[str, str, str | None, str | None]:
    for n_in, n_out, ts, kind in _LAYOUTS:
        if n_in in df.columns and n_out in df.columns:
            return n_in, n_out, (ts if ts in df.columns else None), kind
    wanted = " or ".join(f"({a}, {b})" for a, b, _, _ in _LAYOUTS)
    raise InputError(f"missing token columns: expected {wanted}; found {list(df.columns)}",
                     path=path)


def token_column(values: pd.Series, path: Path, column: str, first_line: int) -> pd.Series:
    """Validate a token-count column: non-negative integers only, as int64.

    Raises
    ------
    InputError
        At the first value that is missing, not a number, negative or fractional.
    """
    numbers = pd.to_numeric(values, errors="coerce")
    bad = numbers.isna() | (numbers < 0) | (numbers != numbers.round())
    if bad.any():
        i = first_bad(bad)
        raise InputError(f"expected a non-negative integer token count, got {values.iloc[i]!r}",
                         path=path, row=i + first_line, field=column)
    return numbers.astype("int64")


def _arrivals(values: pd.Series, kind: str, path: Path, column: str,
              first_line: int) -> pd.Series:
    if kind == "datetime":
        stamps = pd.to_datetime(values, format="ISO8601", errors="coerce")
        bad = stamps.isna()
        if bad.any():
            i = first_bad(bad)
            raise InputError(f"unparsable timestamp {values.iloc[i]!r}", path=path,
                             row=i + first_line, field=column)
        seconds = (stamps - stamps.min()).dt.total_seconds()
    else:
        seconds = pd.to_numeric(values, errors="coerce")
        bad = seconds.isna() | (seconds < 0)
        if bad.any():
            i = first_bad(bad)
            raise InputError(f"expected a non-negative number of seconds, got "
                             f"{values.iloc[i]!r}", path=path, row=i + first_line, field=column)
    return seconds.astype("float64")


def resolve(source: str | Path) -> Path:
    """The file behind ``source``: an existing path, or a bundled workload dataset's table.

    Raises
    ------
    InputError
        When ``source`` is neither.
    """
    path = Path(source)
    if path.exists():
        return path
    from archive.datasets import dataset_dir, info, list_datasets

    if str(source) in list_datasets():
        return dataset_dir(str(source)) / info(str(source))["main_table"]
    raise InputError(f"no such file or bundled dataset (datasets: {', '.join(list_datasets())})",
                     path=source)


def read_workload(source: str | Path) -> pd.DataFrame:
    """Read a workload trace into the archive's workload table.

    Parameters
    ----------
    source : str or Path
        CSV or Parquet file, or a bundled workload dataset name.

    Returns
    -------
    pandas.DataFrame
        One row per request, in trace order: ``n_input_tokens`` (int64), ``n_output_tokens``
        (int64) and, when the trace has timestamps, ``arrival_s`` (float64, seconds since the
        first request).

    Raises
    ------
    InputError
        Unreadable file, missing columns, bad token counts or timestamps, or an empty trace.
    """
    path = resolve(source)
    df, first_line = _read_table(path)
    n_in, n_out, ts, kind = _layout(df, path)
    if df.empty:
        raise InputError("the trace has no requests", path=path)
    out = pd.DataFrame({
        "n_input_tokens": token_column(df[n_in], path, n_in, first_line),
        "n_output_tokens": token_column(df[n_out], path, n_out, first_line),
    })
    if ts is not None:
        out.insert(0, "arrival_s", _arrivals(df[ts], kind, path, ts, first_line))
    return out
