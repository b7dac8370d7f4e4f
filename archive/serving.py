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
    for key in ENGINE_KEYS:
        if key not in engine:
            raise InputError("missing in the engine section", path=card, field=f"engine.{key}")
    if engine["timestamps"] not in TIMESTAMPS:
        raise InputError(f"must be one of {TIMESTAMPS}, got {engine['timestamps']!r}",
                         path=card, field="engine.timestamps")
    for key in ("max_num_seqs", "max_num_batched_tokens", "block_size",
                "tensor_parallel_size"):
        if not (isinstance(engine[key], int) and engine[key] >= 1):
            raise InputError(f"must be an integer >= 1, got {engine[key]!r}", path=card,
                             field=f"engine.{key}")
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
