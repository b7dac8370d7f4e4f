"""Read grid carbon-intensity traces (gCO2 per kWh over time).

A source is a country code of the bundled ``carbon-intensity-entsoe-2022`` dataset (``NL``,
``DE``, ``FR``, ``BE``), a carbon dataset folder, or a Parquet/CSV file with OpenDC's
carbon-trace columns ``timestamp`` and ``carbon_intensity`` (gCO2/kWh). Timestamps without a
zone are UTC, as OpenDC reads them; each value holds from its timestamp until the next.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from archive.errors import InputError, first_bad, shown

CARBON_DATASET = "carbon-intensity-entsoe-2022"


def carbon_countries() -> list[str]:
    """Country codes of the bundled carbon traces."""
    from archive.datasets import info

    return [Path(f).stem for f in info(CARBON_DATASET)["files"]]


def _path(source: str | Path) -> Path:
    from archive.datasets import dataset_dir, resolve

    countries = {c: dataset_dir(CARBON_DATASET) / f"{c}.parquet" for c in carbon_countries()}
    return resolve(source, countries, "countries")


def read_carbon(source: str | Path) -> pd.DataFrame:
    """Read a carbon-intensity trace.

    Returns
    -------
    DataFrame
        ``timestamp`` (datetime64[ns, UTC], strictly increasing) and ``carbon_intensity``
        (float64, gCO2/kWh, non-negative), one row per step.

    Raises
    ------
    InputError
        Unreadable file, missing columns, unparsable, unsorted or duplicate timestamps,
        negative or missing intensities, naming the file, row and field.
    """
    path = _path(source)
    try:
        df = (pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq")
              else pd.read_csv(path))
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise InputError(f"cannot read: {str(exc).splitlines()[0]}", path=path) from None
    missing = [c for c in ("timestamp", "carbon_intensity") if c not in df.columns]
    if missing:
        raise InputError(f"missing column(s) {missing}; found {list(df.columns)}", path=path)
    first_line = 1 if path.suffix.lower() in (".parquet", ".pq") else 2
    stamps = pd.to_datetime(df["timestamp"], utc=True, errors="coerce")
    intensity = pd.to_numeric(df["carbon_intensity"], errors="coerce")
    checks = [(stamps.isna(), "timestamp", "unparsable timestamp"),
              (~np.isfinite(intensity) | (intensity < 0), "carbon_intensity",
               "expected a finite, non-negative number of gCO2/kWh"),
              (stamps.diff() <= pd.Timedelta(0), "timestamp", "timestamps must increase")]
    for bad, column, message in checks:
        if bad.any():
            i = first_bad(bad)
            raise InputError(f"{message}, got {shown(df[column].iloc[i])}", path=path,
                             row=i + first_line, field=column)
    if len(df) < 2:
        raise InputError("a carbon trace needs at least two rows", path=path)
    return pd.DataFrame({"timestamp": stamps, "carbon_intensity": intensity.astype(np.float64)})
