"""Bundled datasets of the LLM Trace Archive: list, describe, locate and load them.

A dataset is a folder under ``archive/data/`` holding its files, a ``dataset.json`` (title,
licence, source, citation, version, tables) and a ``README.md`` dataset card.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from archive.errors import InputError

if TYPE_CHECKING:
    import pandas as pd


def data_root() -> Path:
    """Folder holding the bundled datasets."""
    return Path(str(resources.files("archive") / "data"))


def list_datasets() -> list[str]:
    """Names of the bundled datasets, sorted."""
    return sorted(p.parent.name for p in data_root().glob("*/dataset.json"))


def dataset_dir(name: str) -> Path:
    """Folder of the bundled dataset ``name``.

    Raises
    ------
    InputError
        When there is no such dataset (the message lists the known ones).
    """
    path = data_root() / name
    if not (path / "dataset.json").is_file():
        raise InputError(f"unknown dataset '{name}'; known: {', '.join(list_datasets())}")
    return path


def folder_main_table(path: str | Path) -> Path | None:
    """The main table of the dataset folder ``path`` (from its ``dataset.json``), or None when
    ``path`` is not a dataset folder."""
    path = Path(path)
    if not (path.is_dir() and (path / "dataset.json").is_file()):
        return None
    return path / json.loads((path / "dataset.json").read_text())["main_table"]


def info(name: str) -> dict:
    """The ``dataset.json`` metadata of dataset ``name``."""
    return json.loads((dataset_dir(name) / "dataset.json").read_text())


def load(name: str) -> pd.DataFrame:
    """Load the main table of a bundled dataset as a DataFrame.

    Measurement datasets give the :data:`archive.schema.MEASUREMENTS` columns, workload datasets
    the :data:`archive.schema.WORKLOAD` columns, carbon datasets ``timestamp`` and
    ``carbon_intensity`` (its first country; see :func:`archive.carbon.read_carbon`).
    """
    meta = info(name)
    path = dataset_dir(name) / meta["main_table"]
    if meta["kind"] == "measurements":
        import pandas as pd  # here: ``import archive`` must not cost pandas' import

        return pd.read_parquet(path)
    if meta["kind"] == "carbon":
        from archive.carbon import read_carbon

        return read_carbon(path)
    from archive.traces import read_workload

    return read_workload(path)


def content_sha256(df: pd.DataFrame) -> str:
    """SHA-256 of a table's content (CSV rendering of its rows), independent of file format."""
    return hashlib.sha256(df.to_csv(index=False).encode()).hexdigest()
