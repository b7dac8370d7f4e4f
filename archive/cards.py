"""Dataset metadata (``dataset.json``) and the rendered dataset card (``README.md``).

``dataset.json`` holds: ``name``, ``title``, ``kind`` (measurements, workload, carbon),
``version``, ``schema_version``, ``created``, ``main_table``, ``files``, ``tables`` (rows per
Parquet table), ``rows`` (of the main table), ``sha256`` (of every file), ``description``,
``creators``, ``licence``, ``source``, ``citation``, and where they apply
``hash_block_size``, ``time_origin``, ``dropped_rows`` (reason → count) and ``notes`` (free
text for the card).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq

from archive.schema import SCHEMA_VERSION, SCHEMAS, column_docs

REQUIRED_KEYS = ("name", "title", "kind", "version", "schema_version", "main_table", "files",
                 "rows", "description", "creators", "licence", "source", "citation")
"""Keys every ``dataset.json`` must have."""


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def finish(folder: Path, meta: dict) -> dict:
    """Complete ``meta`` with row counts, checksums, dates and versions, write
    ``dataset.json`` and the ``README.md`` card; returns the completed metadata."""
    folder = Path(folder)
    tables = {f: pq.ParquetFile(folder / f).metadata.num_rows for f in meta["files"]
              if f.endswith(".parquet")}
    meta = {**meta, "schema_version": SCHEMA_VERSION, "tables": tables,
            "rows": tables.get(meta["main_table"], meta.get("rows", 0)),
            "sha256": {f: file_sha256(folder / f) for f in meta["files"]}}
    meta.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    (folder / "README.md").write_text(render(meta))
    return meta


def render(meta: dict) -> str:
    """The dataset card as Markdown, from ``dataset.json`` and the schema's column docs."""
    lines = [f"# {meta['title']}", "", meta["description"], "",
             f"- name: `{meta['name']}`, kind: {meta['kind']}, version {meta['version']}, "
             f"schema {meta['schema_version']}, created {meta.get('created', '?')}",
             f"- creators: {', '.join(meta['creators'])}",
             f"- licence: {meta['licence']}", f"- source: {meta['source']}",
             f"- cite: {meta['citation']}"]
    if meta.get("hash_block_size"):
        lines.append(f"- hash_ids blocks: {meta['hash_block_size']} tokens")
    if meta.get("time_origin"):
        lines.append(f"- arrival_s counts from {meta['time_origin']}")
    dropped = meta.get("dropped_rows") or {}
    if dropped:
        lines.append("- dropped at import (`--drop-invalid`): " + ", ".join(
            f"{n:,} × {reason}" for reason, n in dropped.items()))
    schema = SCHEMAS.get(meta["kind"])
    if schema is not None:
        lines += ["", f"## Columns of `{meta['main_table']}`", "", "| column | type | meaning |",
                  "|---|---|---|"]
        lines += [f"| `{name}` | {schema.field(name).type} | {doc} |"
                  for name, doc in column_docs(schema).items()]
    if meta.get("notes"):
        lines += ["", "## Notes", "", meta["notes"]]
    lines += ["", "## Files", "", "| file | rows | SHA-256 |", "|---|---|---|"]
    lines += [f"| {f} | {meta.get('tables', {}).get(f, '')} | `{meta['sha256'][f]}` |"
              for f in meta["files"]]
    return "\n".join(lines) + "\n"
