"""Serving results (not speed) the batched engine gives on the bundled traces.

Prints, for the Azure 2023 conversation trace on 1, 2, 4 and 8 A100-80GB replicas and the
Mooncake conversation trace on 4 A100-80GB with vLLM-style prefix caching (``blocks``, in each
replica's KV pool): p99 TTFT, p99 TPOT, preemptions, prefix-cache hit rate (tokens), MFU, MBU
and GPU energy. Run: ``python benchmarks/bench_batching.py``.
"""

import time

import archive
from kavier.models.library import gpu_library, llm_library
from kavier.models.power import PowerModel
from kavier.models.timing import make_timing
from kavier.sim.config import EngineConfig
from kavier.sim.prefix import PrefixCache, PrefixCacheConfig
from kavier.sim.simulation import simulate
from kavier.sim.sustainability import Sustainability


def run(label, table, config, block=16, prefix=None):
    timing = make_timing("roofline", llm_library().get("Llama-3-8B"),
                         gpu_library().get("A100-80GB"))
    sus = Sustainability(PowerModel.linear_for(timing.gpu))
    start = time.perf_counter()
    s = simulate(table, timing, config, block, prefix, sus, lambda t: None, lambda b, p: None)
    wall = time.perf_counter() - start
    hit = s["prefix_cache"]["hit_rate_tokens"] if s["prefix_cache"] else 0.0
    print(f"{label:<40} {wall:>6.1f} s  p99 TTFT {s['p99_ttft_s']:>8.3f} s  p99 TPOT "
          f"{s['p99_tpot_s']:.4f} s  preemptions {s['preemptions']:>6,}  hit {hit:.3f}  "
          f"MFU {s['mfu']:.3f}  MBU {s['mbu']:.3f}  "
          f"{s['sustainability']['energy_gpu_wh'] / 1000:.2f} kWh", flush=True)


if __name__ == "__main__":
    azure = archive.read_trace("azure-llm-inference-2023-conv").table
    for n in (1, 2, 4, 8):
        run(f"azure conv, {n} × A100-80GB", azure, EngineConfig(replicas=n))
    mooncake = archive.read_trace("mooncake-fast25-conversation")
    cache = PrefixCache(PrefixCacheConfig("blocks"), mooncake.content)
    run("mooncake conv + blocks, 4 × A100-80GB", mooncake.table, EngineConfig(replicas=4),
        cache.block_size, cache)
