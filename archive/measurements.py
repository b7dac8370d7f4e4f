"""Measurement tables (schema :data:`archive.schema.MEASUREMENTS`) from Parquet or CSV.

A user with their own GPU numbers writes a CSV with the measurement columns (at least those a
calibration needs: ``sweep, n_input_tokens, n_output_tokens, n_output_tokens_requested,
latency_s``; the others may be left out and are null) and either passes it straight to
``kavier calibrate --dataset FILE.csv`` or imports it as a dataset with ``archive import
measurements FILE.csv DEST``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from archive.errors import InputError, shown
from archive.schema import MEASUREMENTS


def read_measurements(path: str | Path) -> pd.DataFrame:
    """A measurements table from a Parquet or CSV file; a CSV's columns are converted to the
    schema's types (its rows keep their file lines in ``attrs["first_line"]``).

    Raises
    ------
    InputError
        Unreadable file, a column outside the schema, or a value that is not of its column's
        type (naming file, line and field).
    """
    path = Path(path)
    if path.suffix.lower() != ".csv":
        try:
            return pd.read_parquet(path)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"cannot read measurements: {str(exc).splitlines()[0]}",
                             path=path) from None
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read as CSV: {exc}", path=path) from None
    unknown = [c for c in df.columns if c not in MEASUREMENTS.names]
    if unknown:
        raise InputError(f"column(s) {unknown} are not in the measurements schema "
                         f"({', '.join(MEASUREMENTS.names)})", path=path)
    out = pd.DataFrame(index=df.index)
    for column in df.columns:
        out[column] = _convert(df[column], MEASUREMENTS.field(column).type, path, column)
    out.attrs["first_line"] = 2
    return out


def _convert(values: pd.Series, arrow_type: pa.DataType, path: Path, column: str) -> pd.Series:
    empty = values.str.strip() == ""
    if pa.types.is_string(arrow_type):
        return values.where(~empty, None)
    if pa.types.is_boolean(arrow_type):
        lowered = values.str.strip().str.lower()
        ok = lowered.isin(["true", "false", "1", "0"]) | empty
        _first_error(~ok, values, path, column, "true or false")
        return lowered.map({"true": True, "1": True, "false": False, "0": False})
    numbers = pd.to_numeric(values.where(~empty, None), errors="coerce")
    bad = numbers.isna() & ~empty
    if pa.types.is_integer(arrow_type):
        bad |= numbers.notna() & ((numbers % 1 != 0) | (numbers.abs() > 2**31 - 1))
        _first_error(bad, values, path, column, "an integer")
        return numbers.astype("Int64")
    bad |= numbers.notna() & ~np.isfinite(numbers)
    _first_error(bad, values, path, column, "a finite number")
    return numbers.astype(np.float64)


def _first_error(bad: pd.Series, values: pd.Series, path: Path, column: str, what: str) -> None:
    if bad.any():
        i = int(bad.to_numpy().argmax())
        raise InputError(f"expected {what}, got {shown(values.iloc[i])}", path=path, row=i + 2,
                         field=column)


def measurements_table(df: pd.DataFrame) -> pa.Table:
    """``df`` as an Arrow table of the full measurements schema (absent columns null)."""
    n = len(df)
    arrays = []
    for field in MEASUREMENTS:
        if field.name in df.columns:
            values = df[field.name].astype(object).where(df[field.name].notna(), None)
            arrays.append(pa.array(values.tolist(), field.type))
        else:
            arrays.append(pa.nulls(n, field.type))
    return pa.Table.from_arrays(arrays, schema=MEASUREMENTS.with_metadata(
        MEASUREMENTS.metadata))


IMPORT_DEFAULTS = {"setup_id": "the dataset's name", "provider": "unspecified",
                   "n_input_tokens_estimated": False,
                   "repetition": "0, 1, … within each (sweep, n_input_tokens, "
                                 "n_output_tokens_requested)"}
"""Values :func:`import_measurements` fills in for required columns a CSV leaves out."""


def with_defaults(df: pd.DataFrame, name: str, src) -> pd.DataFrame:
    """``df`` with :data:`IMPORT_DEFAULTS` filled in where the columns are absent.

    Raises
    ------
    InputError
        When another required (non-nullable) column is missing or has an empty cell.
    """
    df = df.copy()
    for column, value in (("setup_id", name), ("provider", "unspecified"),
                          ("n_input_tokens_estimated", False)):
        if column not in df.columns:
            df[column] = value
    if "repetition" not in df.columns and {"sweep", "n_input_tokens",
                                            "n_output_tokens_requested"} <= set(df.columns):
        df["repetition"] = df.groupby(["sweep", "n_input_tokens",
                                       "n_output_tokens_requested"]).cumcount()
    required = [f.name for f in MEASUREMENTS if not f.nullable]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"missing required column(s) {missing}", path=src)
    for column in required:
        if df[column].isna().any():
            i = int(df[column].isna().to_numpy().argmax())
            raise InputError("empty cell in a required column", path=src,
                             row=i + df.attrs.get("first_line", 1), field=column)
    return df


def import_measurements(src: str | Path, dest: str | Path, name: str | None = None,
                        licence: str = "see source") -> dict:
    """Check a measurements CSV or Parquet file and write it as an archive dataset
    (``measurements.parquet``, ``dataset.json``, card); returns the metadata.

    Raises
    ------
    InputError
        As :func:`read_measurements`.
    """
    from archive.cards import finish

    df = with_defaults(read_measurements(src), name or Path(dest).name, src)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / "measurements.parquet.partial"
    pq.write_table(measurements_table(df), tmp)
    tmp.replace(dest / "measurements.parquet")
    return finish(dest, {
        "name": name or dest.name, "title": f"Measurements from {Path(src).name}",
        "kind": "measurements", "version": "1.0.0", "main_table": "measurements.parquet",
        "files": ["measurements.parquet"], "creators": ["see source"], "licence": licence,
        "source": str(src), "citation": "see source",
        "description": f"{len(df):,} measured requests imported from {Path(src).name}."})
