"""Import a carbon-intensity trace into an archive dataset (``archive import carbon SRC DEST``).

The source is any file :func:`archive.carbon.read_carbon` reads (OpenDC's carbon-trace
columns ``timestamp``, ``carbon_intensity`` in gCO2/kWh); it is checked and written as
``carbon.parquet`` (schema :data:`archive.schema.CARBON`, timestamps in UTC).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from archive.carbon import read_carbon
from archive.cards import finish
from archive.schema import CARBON


def import_carbon(src: str | Path, dest: str | Path, name: str | None = None,
                  licence: str = "as its source", source: str | None = None) -> dict:
    """Check and convert a carbon trace; returns the dataset metadata.

    Raises
    ------
    InputError
        As :func:`archive.carbon.read_carbon`.
    """
    df = read_carbon(src)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_arrays([
        pa.array(df["timestamp"].dt.tz_convert("UTC").dt.tz_localize(None), pa.timestamp("ms")),
        pa.array(df["carbon_intensity"])], schema=CARBON)
    tmp = dest / "carbon.parquet.partial"
    pq.write_table(table, tmp)
    tmp.replace(dest / "carbon.parquet")
    return finish(dest, {
        "name": name or dest.name, "title": f"Carbon intensity from {Path(src).name}",
        "kind": "carbon", "version": "1.0.0", "main_table": "carbon.parquet",
        "files": ["carbon.parquet"], "creators": ["see source"], "licence": licence,
        "source": source or str(src), "citation": "see source",
        "description": f"{len(df):,} steps from {df['timestamp'].iloc[0]} to "
                       f"{df['timestamp'].iloc[-1]}, gCO2/kWh."})
