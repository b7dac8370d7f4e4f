"""Serving runs: requests measured under load, with the engine configuration they ran on.

A serving-run dataset (kind ``serving``, schema :data:`archive.schema.SERVING`) holds one row per
request in ``requests.parquet``, the engine's configuration in ``dataset.json`` under
``engine`` (keys :data:`ENGINE_KEYS`), and optionally ``timeseries.parquet``
(:data:`archive.schema.SERVING_TIMESERIES`). ``engine.timestamps`` says where the latencies
are measured from: ``engine`` (vLLM's own per-request ``queued_ts``: the API server's HTTP and
tokenization are behind them) or ``client`` (the benchmark client's send time: they are in).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from archive.errors import InputError
from archive.traces import PromptContent

ENGINE_KEYS = ("name", "version", "model", "llm", "gpu", "tensor_parallel_size",
               "max_num_seqs", "max_num_batched_tokens", "block_size", "num_gpu_blocks",
               "enable_prefix_caching", "enable_chunked_prefill", "timestamps")
"""Keys of a serving run's ``engine`` section (vLLM's engine-argument names). ``llm`` and
``gpu`` name the model and the board as recorded (a Hugging Face id, an ``nvidia-smi`` name);
``num_gpu_blocks`` and ``enable_prefix_caching`` may be null when the run did not record them;
``timestamps`` is ``engine`` or ``client``. A key in ``assumed`` (a list) was not recorded by
the run and holds the engine's documented default."""

TIMESTAMPS = ("engine", "client")

POSITIVE_INTS = ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size")
"""Engine keys that must hold an integer of at least 1."""

OPTIONAL_POSITIVE_INTS = ("num_gpu_blocks", "data_parallel_size", "pipeline_parallel_size")
"""Engine keys that hold an integer of at least 1 or null (not recorded)."""

OPTIONAL_FLAGS = ("enable_prefix_caching", "enable_chunked_prefill", "enable_expert_parallel",
                  "async_scheduling")
"""Engine keys that hold true, false or null."""


def engine_problems(engine: dict, complete: bool = True) -> list[tuple[str, str]]:
    """What is wrong with a serving run's ``engine`` section, as ``(field, message)`` pairs
    (empty when nothing is): a key of :data:`ENGINE_KEYS` missing (when ``complete``; a
    partial section, such as the settings ``tracer bench --engine`` is given, is checked only
    for the values it has), ``timestamps`` not one of :data:`TIMESTAMPS`, a count that is not
    a whole number of at least 1, a flag that is not true, false or null, or a
    ``gpu_memory_utilization`` outside (0, 1] (NaN and infinity included)."""
    problems = [(f"engine.{key}", "missing in the engine section") for key in ENGINE_KEYS
                if complete and key not in engine]
    if "timestamps" in engine and engine["timestamps"] not in TIMESTAMPS:
        problems.append(("engine.timestamps",
                         f"must be one of {TIMESTAMPS}, got {engine['timestamps']!r}"))
    for key in POSITIVE_INTS + OPTIONAL_POSITIVE_INTS:
        value = engine.get(key)
        if key not in engine or (value is None and key in OPTIONAL_POSITIVE_INTS):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append((f"engine.{key}", f"must be an integer >= 1, got {value!r}"))
    for key in OPTIONAL_FLAGS:
        if engine.get(key) is not None and not isinstance(engine[key], bool):
            problems.append((f"engine.{key}", f"must be true, false or null, got "
                                              f"{engine[key]!r}"))
    share = engine.get("gpu_memory_utilization")
    if share is not None and (isinstance(share, bool) or not isinstance(share, int | float)
                              or not 0 < share <= 1):             # NaN fails the comparison
        problems.append(("engine.gpu_memory_utilization",
                         f"must be a number in (0, 1], got {share!r}"))
    return problems


@dataclass(frozen=True)
class ServingRun:
    """One serving run read from the archive.

    Attributes
    ----------
    requests : pandas.DataFrame
        The :data:`~archive.schema.SERVING` columns, one row per request in arrival order.
    engine : dict
        The run's ``engine`` section (:data:`ENGINE_KEYS`).
    timeseries : pandas.DataFrame or None
        :data:`~archive.schema.SERVING_TIMESERIES` rows, when the run has them.
    hash_block_size : int or None
        Tokens per ``hash_ids`` block.
    path : str
        The dataset folder.
    """

    requests: pd.DataFrame
    engine: dict
    timeseries: pd.DataFrame | None
    hash_block_size: int | None
    path: str

    @property
    def ok(self) -> np.ndarray:
        """Mask of the requests that succeeded."""
        return self.requests["error"].isna().to_numpy()

    def content(self) -> PromptContent | None:
        """The prompts' prefix-block hashes, or None when the run did not record prompts."""
        hashes = self.requests["hash_ids"]
        if hashes.isna().any():
            return None
        lengths = hashes.map(len).to_numpy(np.int64)
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        values = (np.concatenate(hashes.to_list()).astype(np.int64) if offsets[-1]
                  else np.zeros(0, np.int64))
        return PromptContent("hashes", offsets, values, self.hash_block_size)


def read_serving(source: str | Path) -> ServingRun:
    """Read a serving-run dataset (a folder or a bundled dataset's name).

    Raises
    ------
    InputError
        When ``source`` is not a serving-run dataset, its ``engine`` section lacks a key or
        has a bad value, or its table does not match its checksum.
    """
    from archive.datasets import resolve

    table = resolve(source)
    folder = table.parent
    card = folder / "dataset.json"
    meta = json.loads(card.read_text()) if card.is_file() else {}
    if meta.get("kind") != "serving":
        raise InputError(f"not a serving-run dataset (kind {meta.get('kind')!r}); import one "
                         "with archive import llmservingsim|vllm-bench", path=folder)
    engine = meta.get("engine")
    if not isinstance(engine, dict):
        raise InputError("no engine section", path=card, field="engine")
    for field, message in engine_problems(engine)[:1]:
        raise InputError(message, path=card, field=field)
    try:
        requests = pq.read_table(table).to_pandas()
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"cannot read as Parquet: {str(exc).splitlines()[0]}",
                         path=table) from None
    if requests.empty:
        raise InputError("the run has no requests", path=table)
    series = folder / "timeseries.parquet"
    timeseries = pq.read_table(series).to_pandas() if series.is_file() else None
    return ServingRun(requests.sort_values("arrival_s", kind="stable").reset_index(drop=True),
                      engine, timeseries, meta.get("hash_block_size"), str(folder))
