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


def _folder_card(path: Path) -> dict | None:
    """The ``dataset.json`` of the dataset folder ``path`` (with a ``main_table``), or None
    when ``path`` is not a dataset folder.

    Raises
    ------
    InputError
        When the card is not valid JSON or names no main table.
    """
    card = path / "dataset.json"
    if not (path.is_dir() and card.is_file()):
        return None
    try:
        meta = json.loads(card.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON: {exc.msg} at line {exc.lineno}", path=card) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("main_table"), str):
        raise InputError("no main_table", path=card, field="main_table")
    return meta


def info(name: str) -> dict:
    """The ``dataset.json`` metadata of dataset ``name``."""
    return json.loads((dataset_dir(name) / "dataset.json").read_text())


def resolve(source: str | Path, aliases: dict[str, Path] | None = None,
            alias_kind: str = "aliases") -> Path:
    """The one resolver of dataset names and paths: the file behind ``source``.

    In order: a name in ``aliases`` (e.g. carbon-trace country codes) that is not an existing
    path; a dataset folder (its ``dataset.json``'s main table); an existing file; a bundled
    dataset's name (its main table).

    A dataset's table is checked against the SHA-256 its ``dataset.json`` records before it is
    used (:func:`verified`).

    Raises
    ------
    InputError
        When ``source`` is none of these (the message lists the bundled datasets, and the
        aliases, called ``alias_kind``, when there are any), or a dataset's table does not match
        its checksum.
    """
    path = Path(source)
    if aliases and str(source).upper() in aliases and not path.exists():
        return aliases[str(source).upper()]
    if (meta := _folder_card(path)) is not None:
        return verified(path, meta)
    if path.exists():
        return path
    if str(source) in list_datasets():
        return verified(dataset_dir(str(source)), info(str(source)))
    known = f"datasets: {', '.join(list_datasets())}"
    if aliases:
        known += f"; {alias_kind}: {', '.join(sorted(aliases))}"
    raise InputError(f"no such file or bundled dataset ({known})", path=source)


def kind_of(source: str | Path) -> str | None:
    """The ``kind`` of the dataset ``source`` names (a bundled name or a dataset folder), or
    None for a plain file or an unknown name."""
    path = Path(source)
    if (meta := _folder_card(path)) is not None:
        return meta.get("kind")
    if not path.exists() and str(source) in list_datasets():
        return info(str(source)).get("kind")
    return None


def verified(folder: Path, meta: dict) -> Path:
    """The main table of the dataset ``folder`` after checking it against the SHA-256 its
    ``dataset.json`` (``meta``) records; a table without a recorded checksum passes unchecked.

    Raises
    ------
    InputError
        When the file's SHA-256 differs from the recorded one.
    """
    from archive.cards import file_sha256

    table = Path(folder) / meta["main_table"]
    expected = (meta.get("sha256") or {}).get(meta["main_table"])
    if expected is not None and table.is_file() and file_sha256(table) != expected:
        raise InputError("SHA-256 differs from its dataset.json (the file changed); run "
                         "archive validate", path=table)
    return table


def content_sha256(df: pd.DataFrame) -> str:
    """SHA-256 of a table's content (CSV rendering of its rows), independent of file format."""
    return hashlib.sha256(df.to_csv(index=False).encode()).hexdigest()
