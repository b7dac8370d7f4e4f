"""Speed of continuous-batching simulation (issue "Serving under load").

Prints, for the Azure 2023 conversation trace (19,366 requests, one hour) on 1, 2, 4 and 8
A100-80GB replicas (Llama-3-8B, roofline defaults, least-outstanding router), and for the
Mooncake conversation trace (12,031 requests) on 4 A100s with vLLM-style prefix caching
(blocks, pool-sized capacity): wall seconds of the simulation (after loading), p99 TTFT, p99
TPOT and preemptions. Run: ``python benchmarks/bench_batching.py``.
"""

import time

import numpy as np
from kavier.batching import BatchingConfig, BatchSimulator
from kavier.cache import PrefixCache, PrefixCacheConfig, kv_pool_blocks

import archive
from kavier.models.library import gpu_library, llm_library
from kavier.models.timing import make_timing


def run(label, requests, config, cache=None):
    timing = make_timing("roofline", llm_library().get("Llama-3-8B"),
                         gpu_library().get("A100-80GB"))
    start = time.perf_counter()
    r, s = BatchSimulator(timing, config, cache).run(requests, np.arange(len(requests)))
    wall = time.perf_counter() - start
    print(f"{label:<44} {wall:>7.2f} s   p99 TTFT {s['p99_ttft_s']:>9.3f} s   p99 TPOT "
          f"{s['p99_tpot_s']:.4f} s   preemptions {s['preemptions']:,}", flush=True)


if __name__ == "__main__":
    llm, gpu = llm_library().get("Llama-3-8B"), gpu_library().get("A100-80GB")
    pool = kv_pool_blocks(llm, gpu, 16)
    azure = archive.read_workload("azure-llm-inference-2023-conv")
    for n in (1, 2, 4, 8):
        run(f"azure conv, {n} × A100-80GB", azure, BatchingConfig(replicas=n, pool_blocks=pool,
                                                                 router="least-outstanding"))
    mooncake = archive.read_trace("mooncake-fast25-conversation")
    cache = PrefixCache(PrefixCacheConfig("blocks", capacity_blocks=kv_pool_blocks(
        llm, gpu, 512)), mooncake.content)
    run("mooncake conv + prefix cache, 4 × A100-80GB", mooncake.requests,
        BatchingConfig(replicas=4, pool_blocks=pool), cache)
