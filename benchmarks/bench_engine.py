"""Speed of the simulation core (issue "One simulation core").

Prints wall seconds and simulated requests per second of :func:`kavier.sim.simulation.simulate`
(engine plus summary, no files) for:

* the Azure 2023 conversation trace (19,366 requests) batched on 1, 8 and 64 replicas
  (Llama-3-8B on A100-80GB, roofline defaults, vLLM's scheduler defaults, least-outstanding),
  on the compiled loop (:mod:`kavier.sim.compiled`) and, with ``--python``, on the Python
  engine it compiles;
* the Mooncake conversation trace (12,031 requests with their prompts' block hashes) on 8
  replicas with the ``blocks`` prefix cache (vLLM's automatic prefix caching in each KV pool),
  least-outstanding routing; the line after it times hashing the prompt blocks alone, which
  both engines do first;
* a 1,000,000-request trace (the Azure trace repeated with arrivals shifted by its span) on 64
  replicas (``--million``; minutes);
* the Marconi-shaped workload (96,584 requests) one at a time, back to back, thesis timing on an
  A10 (the closed-form path).

The first line times loading the compiled loop (from numba's cache, or compiling it: about
15 s the first time after a change); the runs after it exclude that one-time cost.

Run: ``python benchmarks/bench_engine.py [--million] [--python]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow as pa

import archive
from kavier.analysis.workloads import marconi_shaped
from kavier.models.library import gpu_library, llm_library
from kavier.models.power import PowerModel
from kavier.models.timing import make_timing
from kavier.sim.config import EngineConfig
from kavier.sim.prefix import PrefixCache, PrefixCacheConfig
from kavier.sim.simulation import simulate
from kavier.sim.sustainability import Sustainability


def timed(label: str, table: pa.Table, timing, config: EngineConfig, path="auto",
          prefix=None) -> None:
    sus = Sustainability(PowerModel.linear_for(timing.gpu))
    start = time.perf_counter()
    s = simulate(table, timing, config, 16, prefix, sus, lambda t: None, lambda b, p: None,
                 path=path)
    wall = time.perf_counter() - start
    print(f"{label:<52} {wall:>8.2f} s  {table.num_rows / wall:>9,.0f} req/s  "
          f"({s['engine_path']}; p99 TTFT {s['p99_ttft_s']:.3g} s, "
          f"preemptions {s['preemptions']:,})", flush=True)


def repeated(table: pa.Table, n: int) -> pa.Table:
    """``table`` repeated to ``n`` rows, each copy's arrivals shifted by the trace's span."""
    arrival = table.column("arrival_s").to_numpy()
    span = float(arrival.max() - arrival.min()) + 1.0
    copies = -(-n // table.num_rows)
    out = pa.concat_tables([table] * copies).slice(0, n)
    shifted = np.tile(arrival, copies)[:n] + np.repeat(np.arange(copies) * span,
                                                       table.num_rows)[:n]
    return out.set_column(out.schema.get_field_index("arrival_s"), "arrival_s",
                          pa.array(shifted))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--million", action="store_true", help="also the 1,000,000-request run")
    parser.add_argument("--python", action="store_true",
                        help="also the Python engine on the Azure trace")
    args = parser.parse_args()
    azure = archive.read_trace("azure-llm-inference-2023-conv").table
    a100 = make_timing("roofline", llm_library().get("Llama-3-8B"),
                       gpu_library().get("A100-80GB"))
    timed("loading the compiled loop (10 requests)", azure.slice(0, 10), a100, EngineConfig())
    for n in (1, 8, 64):
        timed(f"azure conv, {n} × A100-80GB, batched", azure, a100, EngineConfig(replicas=n))
        if args.python:
            timed(f"azure conv, {n} × A100-80GB, batched", azure, a100,
                  EngineConfig(replicas=n), path="stepped")
    mooncake = archive.read_trace("mooncake-fast25-conversation")
    for path in ("auto", "stepped") if args.python else ("auto",):
        timed("mooncake conv, 8 × A100-80GB, prefix cache (blocks)", mooncake.table, a100,
              EngineConfig(replicas=8), path,
              PrefixCache(PrefixCacheConfig("blocks"), mooncake.content))
    cache, n_in = PrefixCache(PrefixCacheConfig("blocks"), mooncake.content), \
        mooncake.table.column("n_input_tokens").to_numpy()
    start = time.perf_counter()
    n_keys = sum(len(cache.block_keys(i, int(n) // 16)) for i, n in enumerate(n_in))
    print(f"{'  of which hashing the prompt blocks':<52} {time.perf_counter() - start:>8.2f} s"
          f"  ({n_keys:,} block keys)", flush=True)
    if args.million:
        timed("1,000,000 requests (azure × 52), 64 × A100-80GB", repeated(azure, 1_000_000),
              a100, EngineConfig(replicas=64))
    a10 = make_timing("thesis", llm_library().get("Llama-3-8B"), gpu_library().get("A10"))
    timed("marconi-shaped, one at a time, thesis model, A10", marconi_shaped().table, a10,
          EngineConfig(max_num_seqs=1, back_to_back=True, num_gpu_blocks=10**9))


if __name__ == "__main__":
    main()
