"""Parse ``nvidia-smi --query-gpu=... --format=csv,noheader,nounits`` output into GPU samples.

The tracer's sampler runs nvidia-smi on the GPU node with ``--loop-ms=N``; this module turns its
lines into the archive's GPU-samples table, one row per sample, with snake_case columns and
units in the names.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from archive.errors import InputError, first_bad, shown
from archive.schema import GPU_SAMPLES

if TYPE_CHECKING:
    import pandas as pd

FIELDS = {
    # nvidia-smi query field: (column, kind)
    "timestamp": ("timestamp", "time"),
    "index": ("gpu_index", "int"),
    "utilization.gpu": ("utilization_gpu_pct", "float"),
    "utilization.memory": ("utilization_memory_pct", "float"),
    "power.draw": ("power_w", "float"),
    "power.draw.instant": ("power_w", "float"),
    "memory.used": ("memory_used_mib", "float"),
    "clocks.sm": ("clock_sm_mhz", "float"),
    "temperature.gpu": ("temperature_c", "float"),
}
"""Query fields the parser understands, and the column each becomes."""

CAPTURE_FIELDS = ("timestamp", "utilization.gpu", "utilization.memory", "power.draw",
                  "memory.used", "clocks.sm", "temperature.gpu")
"""Field order of the bundled H100 capture (tests/data/nvidia-smi-h100-loop100ms.csv)."""


MISSING = ("[N/A]", "N/A", "[Not Supported]", "[Unknown Error]", "[GPU is lost]")
"""What nvidia-smi prints for a value it cannot read."""


def parse(lines: list[str], fields: tuple[str, ...] = CAPTURE_FIELDS,
          source: str = "nvidia-smi", missing_ok: bool = False) -> pd.DataFrame:
    """Parse nvidia-smi CSV lines (no header, no units) for the query ``fields``.

    Returns
    -------
    DataFrame
        One row per sample; ``timestamp`` as datetime64 (nvidia-smi's local time,
        ``YYYY/MM/DD HH:MM:SS.mmm``) and the other fields as numbers (see :data:`FIELDS`).

    With ``missing_ok``, a value nvidia-smi could not read (:data:`MISSING`) becomes NaN (a
    gap the caller reports) instead of an error.

    Raises
    ------
    InputError
        For an unknown field, a line with the wrong number of values, or a value that is not
        a finite, non-negative number (``[N/A]`` or ``[Not Supported]`` included unless
        ``missing_ok``), naming the line and field.
    """
    unknown = [f for f in fields if f not in FIELDS]
    if unknown:
        raise InputError(f"unknown nvidia-smi field(s) {unknown}; known: {list(FIELDS)}")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        values = [v.strip() for v in line.split(",")]
        if len(values) != len(fields):
            raise InputError(f"expected {len(fields)} values, got {len(values)}", path=source,
                             row=number)
        rows.append((number, values))
    if not rows:
        raise InputError("no samples", path=source)
    import pandas as pd  # here: ``kavier simulate`` imports this module and runs without pandas

    table = pd.DataFrame([v for _, v in rows], columns=list(fields))
    out = pd.DataFrame(index=table.index)
    for field in fields:
        column, kind = FIELDS[field]
        if kind == "time":
            parsed = pd.to_datetime(table[field], format="%Y/%m/%d %H:%M:%S.%f", errors="coerce")
            bad = parsed.isna()
        else:         # every field is a count, a share, watts, MiB, MHz or °C: none below 0
            parsed = pd.to_numeric(table[field], errors="coerce")
            bad = ~((parsed >= 0) & (parsed < float("inf")))       # NaN, inf, negative
            if missing_ok:
                bad &= ~table[field].isin(MISSING)
        if bad.any():
            i = first_bad(bad)
            what = "timestamp" if kind == "time" else "finite, non-negative number"
            raise InputError(f"not a {what}: {shown(table[field].iloc[i])}", path=source,
                             row=rows[i][0], field=field)
        out[column] = parsed.astype("int32") if kind == "int" and not parsed.isna().any() \
            else parsed
    return out


def read_capture(path: str | Path, fields: tuple[str, ...] = CAPTURE_FIELDS) -> pd.DataFrame:
    """Parse a file of captured nvidia-smi output (see :func:`parse`)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", path=path) from None
    return parse(lines, fields, str(path))


def samples_table(samples: pd.DataFrame, run_id: str,
                  fields: tuple[str, ...] = CAPTURE_FIELDS) -> pa.Table:
    """Parsed samples as an archive GPU-samples table (:data:`archive.schema.GPU_SAMPLES`).

    ``power_field`` records which nvidia-smi field ``power_w`` came from: ``power.draw.instant``
    when it was queried (an instantaneous reading), else ``power.draw`` (a one-second average on
    Ampere and newer). Columns not queried are null; ``request_id`` is null (the sampler of
    ``tracer collect`` fills it); a ``run_id`` column of ``samples`` (a resumed sweep's
    samples) wins over ``run_id``.
    """
    n = len(samples)
    runs = samples["run_id"] if "run_id" in samples.columns else [run_id] * n
    columns = {"run_id": pa.array(runs, pa.string()),
               "power_field": pa.array(["power.draw.instant" if "power.draw.instant" in fields
                                        else "power.draw"] * n, pa.string())}
    for field in GPU_SAMPLES:
        if field.name in samples.columns:
            columns[field.name] = pa.array(samples[field.name], field.type)
        columns.setdefault(field.name, pa.nulls(n, field.type))
    return pa.Table.from_arrays([columns[f.name] for f in GPU_SAMPLES], schema=GPU_SAMPLES)
