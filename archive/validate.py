"""Check a dataset folder completely: ``archive validate PATH``.

Every problem found is reported, not just the first: missing or malformed ``dataset.json``
keys, missing files, checksum and row-count mismatches, main-table columns that are not in the
kind's schema or have the wrong type, and bad values (negative token counts, arrivals before
zero, session turns that do not increase, content lists of the wrong length, failed or
non-positive latencies, unsorted carbon steps), nulls in required columns, non-finite
times and token counts past :data:`archive.traces.MAX_TOKENS` (the rules the readers enforce),
schema versions this toolkit does not know, and tables that cannot be read (truncated or
corrupt), one line each. Tables are read batch by batch, so a large dataset is checked in
bounded memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from archive.cards import REQUIRED_KEYS, file_sha256
from archive.schema import KNOWN_SCHEMA_VERSIONS, SCHEMAS
from archive.serving import engine_problems
from archive.traces import MAX_TOKENS, content_lengths, turns_not_increasing


def _meta(folder: Path) -> tuple[dict | None, list[str]]:
    try:
        meta = json.loads((folder / "dataset.json").read_text())
    except OSError:
        return None, [f"{folder}: no dataset.json"]
    except json.JSONDecodeError as exc:
        return None, [f"{folder / 'dataset.json'}: not valid JSON: {exc}"]
    if not isinstance(meta, dict):
        return None, [f"{folder / 'dataset.json'}: not a JSON object"]
    problems = [f"dataset.json: missing key '{k}'" for k in REQUIRED_KEYS if k not in meta]
    version = meta.get("schema_version")
    if version is not None and str(version) not in KNOWN_SCHEMA_VERSIONS:
        problems.append(f"dataset.json: schema_version {version!r} is not one this toolkit "
                        f"knows ({', '.join(KNOWN_SCHEMA_VERSIONS)})")
    return meta, problems


def _files(folder: Path, meta: dict) -> list[str]:
    problems = []
    sums = meta.get("sha256") or {}
    for name in meta.get("files", []):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: listed in dataset.json but missing")
        elif name not in sums:
            problems.append(f"{name}: no SHA-256 in dataset.json")
        elif file_sha256(path) != sums[name]:
            problems.append(f"{name}: SHA-256 differs from dataset.json (file changed)")
    for name, rows in (meta.get("tables") or {}).items():
        if not (folder / name).is_file():
            continue
        try:
            found = pq.ParquetFile(folder / name).metadata.num_rows
        except (OSError, pa.ArrowException) as exc:
            problems.append(f"{name}: cannot read as Parquet: {str(exc).splitlines()[0]}")
            continue
        if found != rows:
            problems.append(f"{name}: {found} rows, dataset.json says {rows}")
    if not (folder / "README.md").is_file():
        problems.append("README.md: missing dataset card")
    return problems


def _columns(name: str, file_schema: pa.Schema, schema: pa.Schema) -> list[str]:
    problems = []
    for field in file_schema:
        if field.name not in schema.names:
            kind = schema.metadata[b"schema"].decode()
            problems.append(f"{name}: column '{field.name}' is not in the {kind} schema")
        elif not field.type.equals(schema.field(field.name).type) and not (
                pa.types.is_null(field.type) and schema.field(field.name).nullable):
            problems.append(f"{name}: column '{field.name}' has type {field.type}, schema says "
                            f"{schema.field(field.name).type}")
    problems += [f"{name}: required column '{f.name}' missing" for f in schema
                 if not f.nullable and f.name not in file_schema.names]
    return problems


def _first_rows(mask: np.ndarray, offset: int, limit: int = 3) -> str:
    rows = np.flatnonzero(mask)[:limit] + offset + 1
    return ", ".join(str(r) for r in rows) + (" …" if mask.sum() > limit else "")


class _Checker:
    """Value checks of one kind, fed batch by batch."""

    def __init__(self, name: str, kind: str, meta: dict) -> None:
        self.name, self.kind, self.meta = name, kind, meta
        self.problems: list[str] = []
        self.last_turn: dict = {}
        self.last_time = None

    def flag(self, mask, offset: int, what: str) -> None:
        mask = np.asarray(mask, bool)
        if mask.any():
            self.problems.append(f"{self.name}: {int(mask.sum())} row(s) with {what} "
                                 f"(rows {_first_rows(mask, offset)})")

    def batch(self, b: pa.RecordBatch, offset: int, schema: pa.Schema) -> None:
        for field in schema:
            if not field.nullable and field.name in b.schema.names:
                column = self._column(b, field.name)
                if column.null_count:
                    self.flag(pc.is_null(column).to_numpy(zero_copy_only=False), offset,
                              f"a null in required column {field.name}")
        getattr(self, f"_{self.kind}")(b, offset)

    def _tokens(self, b, offset, column):
        values = self._column(b, column).to_numpy(zero_copy_only=False)
        self.flag(values < 0, offset, f"negative {column}")
        self.flag(values > MAX_TOKENS, offset, f"{column} above {MAX_TOKENS:,}")
        return values

    def _column(self, b, name):
        return b.column(b.schema.get_field_index(name)) if name in b.schema.names else None

    def _workload(self, b, offset):
        n_in = self._tokens(b, offset, "n_input_tokens")
        self._tokens(b, offset, "n_output_tokens")
        arrival = self._column(b, "arrival_s")
        if arrival is not None:
            values = pc.fill_null(arrival, 0.0).to_numpy(zero_copy_only=False)
            self.flag(values < 0, offset, "negative arrival_s")
            self.flag(~np.isfinite(values), offset, "a NaN or infinite arrival_s")
        sessions, turns = self._column(b, "session_id"), self._column(b, "turn_id")
        if sessions is not None and turns is not None and sessions.null_count < len(b):
            bad = turns_not_increasing(sessions.to_pylist(), turns.to_pylist(), self.last_turn)
            self.flag(bad, offset, "a turn_id not above the session's previous turn")
        for column, block in (("input_tokens", None),
                              ("hash_ids", self.meta.get("hash_block_size"))):
            lists = self._column(b, column)
            if lists is None or lists.null_count == len(b) or (column == "hash_ids"
                                                               and not block):
                continue
            lengths = pc.fill_null(pc.list_value_length(lists), -1).to_numpy(
                zero_copy_only=False)
            expected = content_lengths(n_in, block)
            self.flag((lengths >= 0) & (lengths != expected), offset,
                      f"{column} of the wrong length for n_input_tokens")

    def _measurements(self, b, offset):
        latency = self._column(b, "latency_s").to_numpy(zero_copy_only=False)
        error = self._column(b, "error")
        failed = (np.zeros(len(b), bool) if error is None
                  else pc.is_valid(error).to_numpy(zero_copy_only=False))
        self.flag(~((latency > 0) & np.isfinite(latency)) & ~failed, offset,
                  "non-positive or infinite latency_s (and no error)")
        for column in ("n_input_tokens", "n_output_tokens"):
            self._tokens(b, offset, column)

    def _serving(self, b, offset):
        for column in ("n_input_tokens", "n_output_tokens"):
            self._tokens(b, offset, column)
        arrival = self._column(b, "arrival_s").to_numpy(zero_copy_only=False)
        self.flag(~(np.isfinite(arrival) & (arrival >= 0)), offset,
                  "a negative, NaN or infinite arrival_s")
        error = self._column(b, "error")
        ok = (np.ones(len(b), bool) if error is None
              else pc.is_null(error).to_numpy(zero_copy_only=False))
        ttft, e2e = (pc.fill_null(self._column(b, c), np.nan).to_numpy(zero_copy_only=False)
                     for c in ("ttft_s", "e2e_s"))
        self.flag(ok & ~((ttft >= 0) & np.isfinite(ttft)), offset,
                  "a missing, negative or infinite ttft_s (and no error)")
        self.flag(ok & ~((e2e >= ttft) & np.isfinite(e2e)), offset,
                  "an e2e_s below ttft_s or infinite (and no error)")

    def _carbon(self, b, offset):
        stamps = self._column(b, "timestamp").cast(pa.int64()).to_numpy(zero_copy_only=False)
        previous = np.concatenate(([self.last_time if self.last_time is not None
                                    else stamps[0] - 1], stamps[:-1]))
        self.flag(stamps <= previous, offset, "timestamps not increasing")
        self.last_time = stamps[-1] if len(stamps) else self.last_time
        intensity = self._column(b, "carbon_intensity").to_numpy(zero_copy_only=False)
        self.flag(~((intensity >= 0) & np.isfinite(intensity)), offset,
                  "negative, missing or infinite carbon_intensity")


def validate(path: str | Path) -> list[str]:
    """Every problem of the dataset at ``path`` (a folder or its ``dataset.json``); empty when
    it is valid."""
    folder = Path(path)
    folder = folder.parent if folder.name == "dataset.json" else folder
    meta, problems = _meta(folder)
    if meta is None:
        return problems
    problems += _files(folder, meta)
    kind, main = meta.get("kind"), meta.get("main_table", "")
    schema = SCHEMAS.get(kind)
    if schema is None:
        return problems + [f"dataset.json: unknown kind {kind!r}; known: {', '.join(SCHEMAS)}"]
    if kind == "serving":
        engine = meta.get("engine")
        problems += ([f"dataset.json: {field}: {message}"
                      for field, message in engine_problems(engine)]
                     if isinstance(engine, dict) else ["dataset.json: no engine section"])
    tables = [f for f in meta.get("files", []) if f.endswith(".parquet")
              and (f == main or kind == "carbon")]
    if not main.endswith(".parquet"):
        problems.append(f"{main}: the main table is not Parquet (import it with archive import)")
    for name in tables:
        if not (folder / name).is_file():
            continue
        checker = _Checker(name, kind, meta)
        try:
            file = pq.ParquetFile(folder / name)
            columns = _columns(name, file.schema_arrow, schema)
            problems += columns
            if columns:
                continue
            offset = 0
            for batch in file.iter_batches(batch_size=65_536):
                checker.batch(batch, offset, schema)
                offset += batch.num_rows
        except (OSError, pa.ArrowException) as exc:
            checker.problems.append(f"{name}: cannot read as Parquet: "
                                    f"{str(exc).splitlines()[0]}")
        problems += checker.problems
    return list(dict.fromkeys(problems))          # a file unreadable twice is one problem
