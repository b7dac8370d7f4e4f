"""Reproduce the thesis's experiments (chapter 6): ``kavier reproduce EXPERIMENT``.

Each experiment writes a folder with its data (CSV), its figure (PNG and PDF) and
``report.md``, which states the thesis's number, ours, and why they differ where they do.

========== ============================================================================
accuracy   Figure 6.2: measured vs simulated prefill and decode on the A10 (MAPE per stage)
speed      Figure 6.3 / Table 6.9: wall time vs export rate, Marconi-shaped workload
kv-cache   Figure 6.4: decode GPU-time with KV cache on and off, four LLMs on an A100-80GB
prefix-    Figures 6.5–6.6: hit ratio and prefill GPU-hours vs minimum prefix length
length
cache-size Figure 6.7: hit ratio and GPU-hours vs session cache size (2–64 prompts, LRU)
========== ============================================================================

The thesis's prefix experiments ran on the aggregated Marconi trace, which is not public. We
run them on (a) the Marconi-shaped synthetic workload (:mod:`kavier.analysis.workloads`) with
session caches, as the thesis did, and (b) the real Mooncake conversation trace, whose requests
carry no session, with a global cache of the same sizes. Sweeps run their points in parallel
(:mod:`kavier.analysis.sweep`). ``quick=True`` shrinks every experiment for tests and notebooks.
"""

from __future__ import annotations

import tempfile
import time
from functools import lru_cache

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import archive  # noqa: E402
from archive.traces import Workload  # noqa: E402
from kavier.analysis.sweep import run_points  # noqa: E402
from kavier.analysis.workloads import marconi_shaped  # noqa: E402
from kavier.export.output import RunWriter, run_folder  # noqa: E402
from kavier.export.run import ExportOptions, RunOutput, replica_memory_bytes  # noqa: E402
from kavier.models.library import gpu_library, llm_library  # noqa: E402
from kavier.models.power import PowerModel  # noqa: E402
from kavier.models.timing import make_timing  # noqa: E402
from kavier.sim.config import EngineConfig  # noqa: E402
from kavier.sim.prefix import PrefixCache, PrefixCacheConfig  # noqa: E402
from kavier.sim.simulation import simulate  # noqa: E402
from kavier.sim.sustainability import Sustainability  # noqa: E402

EXPERIMENTS = ("accuracy", "speed", "kv-cache", "prefix-length", "cache-size")
HOURS_PER_YEAR = 24 * 365


def _save(out: RunWriter, fig, name: str) -> None:
    for ext in ("png", "pdf"):
        out.file(f"{name}.{ext}", lambda p, e=ext: fig.savefig(p, dpi=120, format=e))
    plt.close(fig)


def _table(df: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
    body = "".join("| " + " | ".join(floatfmt.format(v) if isinstance(v, float) else str(v)
                                     for v in row) + " |\n" for row in df.itertuples(index=False))
    return head + body


# --- accuracy (Figure 6.2) ------------------------------------------------------------------

def accuracy(out: RunWriter, quick: bool = False, **_) -> dict:
    """Calibrate the roofline model on the bundled A10 sweeps and score it against the
    thesis's defaults (thesis MF2: 7.39 % prefill, 4.00 % decode MAPE)."""
    from archive.importers.a10_surf import table_medians
    from calibrate.estimator import TimingRegressor
    from calibrate.fit import calibrate
    from calibrate.report import figure

    name = "a10-surf-vllm-llama3-8b"
    df = archive.load(name)
    est = TimingRegressor(llm=llm_library().get("Llama-3-8B"), gpu=gpu_library().get("A10"),
                          timing_model="roofline", attention_efficiency=1.0)
    result = calibrate(df, est, name, table_medians(archive.dataset_dir(name)))
    out.text("medians.csv", result.medians.to_csv(index=False))
    _save(out, figure(result, "Llama-3-8B on A10 (vLLM 0.9.0, SURF)"), "accuracy")
    s = result.scores
    rows = pd.DataFrame([
        ("thesis (MF2, its scoring)", 7.39, 4.00),
        ("thesis defaults, thesis scoring (ours)", s["thesis_defaults_thesis_scoring"]["prefill"],
         s["thesis_defaults_thesis_scoring"]["decode"]),
        ("thesis defaults, every request as sent",
         s["thesis_defaults"]["prefill"]["per_size_median"],
         s["thesis_defaults"]["decode"]["per_size_median"]),
        ("calibrated roofline, held out", s["heldout"]["prefill"]["per_size_median"],
         s["heldout"]["decode"]["per_size_median"]),
    ], columns=["model and scoring", "prefill MAPE %", "decode MAPE %"])
    out.text("report.md", "# Accuracy (thesis Figure 6.2)\n\n" + _table(rows, "{:.2f}") + (
        "\nPer-size-median MAPE. The thesis scores prefill sizes as if no token were generated; "
        "simulated as sent (one output token, which eq. 4.3 charges a full decode step) the "
        "thesis model misses prefill by far more. The calibrated roofline model (docs/models.md) "
        "is scored leave-one-size-out. Figure: accuracy.png.\n"))
    return {"rows": rows}


# --- speed (Figure 6.3, Table 6.9) -----------------------------------------------------------

THESIS_SPEED_S = {1.0: 9.9, 0.1: 92.8, 0.01: 914.8, 0.001: 9039.7}
"""Thesis Table 6.9: prototype wall time per export rate, 96,870-request Marconi trace."""


ONE_AT_A_TIME = EngineConfig(max_num_seqs=1, back_to_back=True, num_gpu_blocks=10**9)
"""The thesis's mode: one request at a time, back to back, KV memory not limiting."""


def _sustainability(gpu) -> Sustainability:
    return Sustainability(PowerModel.linear_for(gpu))


def speed(out: RunWriter, quick: bool = False, **_) -> dict:
    """Simulation plus all Parquet writing at several export rates, in this process."""
    workload = marconi_shaped(sessions=300 if quick else 3000)
    rates = (1.0, 0.1) if quick else (1.0, 0.1, 0.01)
    rows = []
    for rate in rates:
        timing = make_timing("thesis", llm_library().get("Llama-3-8B"), gpu_library().get("A10"))
        sus = _sustainability(timing.gpu)
        with tempfile.TemporaryDirectory() as tmp, run_folder(tmp) as folder:
            start = time.perf_counter()
            with RunOutput(folder, ExportOptions(export_rate_s=rate), sus, timing.gpu,
                           1) as output:
                summary = simulate(workload.table, timing, ONE_AT_A_TIME, 16, None, sus,
                                   output.requests, output.steps)
                written = output.finish(summary["timeline_s"],
                                        replica_memory_bytes(timing, summary))
            wall = time.perf_counter() - start
        rows.append({"export_rate_s": rate, "requests": workload.table.num_rows,
                     "gpu_hours": summary["gpu_hours"],
                     "fragment_rows": written["fragments.parquet"], "wall_s": wall,
                     "thesis_prototype_s": THESIS_SPEED_S[rate]})
    data = pd.DataFrame(rows)
    out.text("speed.csv", data.to_csv(index=False))
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.loglog(data["export_rate_s"], data["wall_s"], "o-", label="this toolkit (this machine)")
    ax.loglog(list(THESIS_SPEED_S), list(THESIS_SPEED_S.values()), "s--",
              label="thesis prototype (Table 6.9, its machine)")
    ax.set_xlabel("export rate [s]")
    ax.set_ylabel("wall time [s]")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    _save(out, fig, "speed")
    out.text("report.md", "# Speed (thesis Figure 6.3, Table 6.9)\n\n" + _table(data) + (
        "\nMarconi-shaped synthetic workload (the Marconi trace is not public). In-process wall "
        "time of simulation plus writing requests, fragments and the OpenDC workload. The "
        "thesis's times are from its own machine; docs/simulator.md has a same-machine "
        "comparison with the published prototype (pip package kavier 0.5.3).\n"))
    return {"data": data}


# --- KV cache on/off (Figure 6.4) --------------------------------------------------------------

KV_MODELS = ("Llama-3-8B", "Llama-2-13B", "Granite-20B", "MPT-30B")
THESIS_KV = {"off_gpu_years": 58.76, "on_gpu_years": 0.11, "ratio": 497}


def _kv_point(p: dict) -> dict:
    w = _workload(p["workload"], p["quick"]).requests
    timing = make_timing(p["timing"], llm_library().get(p["llm"]),
                         gpu_library().get("A100-80GB"), kv_cache=p["kv"])
    decode_s = float(timing.decode_s(w["n_input_tokens"].to_numpy(),
                                     w["n_output_tokens"].to_numpy()).sum())
    return {**p, "decode_gpu_years": decode_s * p["copies"] / 3600 / HOURS_PER_YEAR}


def kv_cache(out: RunWriter, quick: bool = False, scheduler: str | None = None,
             workers: int | None = None) -> dict:
    """Decode GPU-time of the Marconi-shaped workload × 1,000 (the thesis's 1,000 × Marconi)
    and of the Azure conversation trace × 1,000 (real request sizes) with the KV cache on and
    off, thesis and roofline timing, on an A100-80GB."""
    points = [{"workload": w, "llm": m, "timing": t, "kv": kv, "copies": 1000, "quick": quick}
              for w in ("marconi", "azure") for m in KV_MODELS for t in ("thesis", "roofline")
              for kv in (True, False)]
    data = pd.DataFrame(run_points(_kv_point, points, scheduler, workers)).drop(columns="quick")
    out.text("kv_cache.csv", data.to_csv(index=False))
    azure = data[data["workload"] == "azure"].pivot_table(
        index=["timing", "llm"], columns="kv", values="decode_gpu_years")
    azure.columns = ["off", "on"]
    azure["ratio"] = azure["off"] / azure["on"]
    data_marconi = data[data["workload"] == "marconi"]
    pivot = data_marconi.pivot_table(index=["timing", "llm"], columns="kv",
                                     values="decode_gpu_years")
    pivot.columns = ["off", "on"]
    pivot["ratio"] = pivot["off"] / pivot["on"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for ax, timing in zip(axes, ("thesis", "roofline"), strict=True):
        part = pivot.loc[timing]
        y = np.arange(len(part))
        ax.barh(y + 0.2, part["on"], 0.4, label="KV cache on")
        ax.barh(y - 0.2, part["off"], 0.4, label="KV cache off")
        ax.set_yticks(y, part.index)
        ax.set_xscale("log")
        ax.set_title(f"{timing} timing model")
        ax.set_xlabel("decode GPU-years (A100-80GB)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    _save(out, fig, "kv_cache")
    totals = pivot.groupby(level="timing")[["off", "on"]].sum()
    totals["ratio"] = totals["off"] / totals["on"]
    out.text("report.md", "# KV cache on and off (thesis Figure 6.4)\n\n"
             "Marconi-shaped workload × 1,000, decode GPU-years on an A100-80GB:\n\n" + _table(
        pivot.reset_index()) + "\nTotals over the four models:\n\n" + _table(
        totals.reset_index()) + "\nThe Azure 2023 conversation trace × 1,000 (real request "
        "sizes: 211 output tokens on average):\n\n" + _table(azure.reset_index()) + (
        f"\nThesis: {THESIS_KV['off_gpu_years']} GPU-years off, {THESIS_KV['on_gpu_years']} on, "
        f"{THESIS_KV['ratio']}× (MF5), on 1,000 × the Marconi trace. Ours: the Marconi-shaped "
        "workload × 1,000 (decode time adds up over copies). The thesis model's KV-off decode "
        "(eq. 4.4) charges `n(n+1)/2` KV-on steps; the roofline model re-runs a forward pass "
        "over the growing context per token, which is bound by streaming the weights for short "
        "contexts, so its KV-off penalty is far smaller for short outputs and grows with the "
        "context. KV-off never beats KV-on in either model. The thesis's absolute figures "
        "cannot be matched: its own section 6.4 puts one Marconi trace at about 390 A10 "
        "decode GPU-hours, which is about 115 A100 GPU-hours for Llama-3-8B alone (3.4× the "
        "bandwidth), so 1,000 copies of four models cannot take 0.11 GPU-years; the ratio "
        "(eq. 4.4 averages (n_out + 1) / 2 over the output lengths) is what carries over.\n"))
    return {"data": data, "totals": totals}


# --- prefix caching (Figures 6.5–6.7) ------------------------------------------------------------

@lru_cache(maxsize=4)
def _workload(name: str, quick: bool):
    if name == "marconi":
        return marconi_shaped(sessions=200 if quick else 3000, block_size=512)
    if name == "azure":
        trace = archive.read_trace("azure-llm-inference-2023-conv")
        return trace if not quick else Workload(trace.table.slice(0, 2000), None, trace.source)
    return archive.read_trace("mooncake-fast25-conversation")


def _prefix_point(p: dict) -> dict:
    workload = _workload(p["trace"], p["quick"])
    timing = make_timing("thesis", llm_library().get("Llama-3-8B"), gpu_library().get("A10"))
    cache = None
    if p["min_tokens"]:
        config = PrefixCacheConfig("prefill", p["min_tokens"], p["cache_prompts"], p["scope"])
        cache = PrefixCache(config, workload.content, workload.session_ids())
    s = simulate(workload.table, timing, ONE_AT_A_TIME, cache.block_size if cache else 16,
                 cache, _sustainability(timing.gpu), lambda t: None, lambda b, q: None)
    stats = s.get("prefix_cache") or {}
    return {**{k: v for k, v in p.items() if k != "quick"},
            "hit_ratio_requests": stats.get("hit_rate_requests", 0.0),
            "hit_ratio_lookups": cache.hits / cache.lookups if cache and cache.lookups else 0.0,
            "prefill_gpu_hours": s["prefill_gpu_hours"], "gpu_hours": s["gpu_hours"]}


def _prefix_sweep(lengths, sizes, quick, scheduler, workers) -> pd.DataFrame:
    points = []
    for trace, scope in (("marconi", "session"), ("mooncake", "global")):
        points.append({"trace": trace, "scope": scope, "min_tokens": 0, "cache_prompts": 0,
                       "quick": quick})
        points += [{"trace": trace, "scope": scope, "min_tokens": n, "cache_prompts": c,
                    "quick": quick} for n in lengths for c in sizes]
    data = pd.DataFrame(run_points(_prefix_point, points, scheduler, workers))
    base = data[data["min_tokens"] == 0].set_index("trace")["prefill_gpu_hours"]
    data["prefill_saving"] = 1.0 - data["prefill_gpu_hours"] / data["trace"].map(base)
    return data


def prefix_length(out: RunWriter, quick: bool = False, scheduler: str | None = None,
                  workers: int | None = None) -> dict:
    """Hit ratio and prefill GPU-hours vs minimum prefix length (1,024/2,048/4,096) for caches
    of 8 and 16 prompts (thesis Figures 6.5, 6.6)."""
    data = _prefix_sweep((1024, 2048, 4096), (8, 16), quick, scheduler, workers)
    out.text("prefix_length.csv", data.to_csv(index=False))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for trace, style in (("marconi", "-"), ("mooncake", "--")):
        for size in (8, 16):
            part = data[(data["trace"] == trace) & (data["cache_prompts"] == size)]
            label = f"{trace} ({part['scope'].iloc[0]}), {size} prompts"
            axes[0].plot(part["min_tokens"], part["hit_ratio_requests"] * 100, "o" + style,
                         label=label)
            axes[1].plot(part["min_tokens"], part["prefill_gpu_hours"], "o" + style,
                         label=label)
    for ax, ylabel in zip(axes, ("cache hit ratio [%]", "prefill GPU-hours (A10)"),
                          strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("minimum prefix length [tokens]")
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    _save(out, fig, "prefix_length")
    shown = data[data["min_tokens"] > 0][["trace", "scope", "min_tokens", "cache_prompts",
                                          "hit_ratio_requests", "prefill_saving"]]
    out.text("report.md", "# Prefix length (thesis Figures 6.5, 6.6)\n\n" + _table(shown) + (
        "\nThesis (Marconi, session caches, LRU): at 1,024 tokens hit ratios of 5.14 % (8 "
        "prompts) and 11.21 % (16 prompts) (MF8); prefill saving 4.0 % (8) and 8.8 % (16) of "
        "124.15 GPU-hours (MF9, MF10). Ours: the Marconi-shaped workload (session caches) and "
        "the real Mooncake trace (no sessions: one global cache). The policy is the thesis's "
        "exact match with T_p = 0 on a hit (docs/simulator.md explains why `blocks` is the "
        "physical alternative). In the synthetic workload every turn repeats the whole "
        "conversation (append-only chat), so all of a session's turns long enough share its "
        "first 1,024 tokens: Listing 4.2's key is then the same for the whole session, one "
        "entry per session suffices, and the cache size does not matter. The thesis's strong "
        "dependence on cache size (cache-size experiment) cannot arise from append-only "
        "sessions under that key, which suggests its aggregated trace mixes sessions whose "
        "turns do not share their opening tokens. Mooncake has no sessions; with one global "
        "cache of a few prompts almost nothing is reused at these prefix lengths, while "
        "vLLM-style block reuse with an unbounded pool reuses 37 % of its input tokens "
        "(docs/simulator.md).\n"))
    return {"data": data}


def cache_size(out: RunWriter, quick: bool = False, scheduler: str | None = None,
               workers: int | None = None) -> dict:
    """Hit ratio and prefill GPU-hours vs cache size 2–64 prompts at 1,024 tokens (thesis
    Figure 6.7, whose "GPU time" is the prefill time: 124.15 hours without caching)."""
    data = _prefix_sweep((1024,), (2, 4, 8, 16, 32, 64), quick, scheduler, workers)
    out.text("cache_size.csv", data.to_csv(index=False))
    fig, ax = plt.subplots(figsize=(6, 4))
    right = ax.twinx()
    for trace, style in (("marconi", "-"), ("mooncake", "--")):
        part = data[(data["trace"] == trace) & (data["min_tokens"] > 0)]
        ax.plot(part["cache_prompts"], part["hit_ratio_requests"] * 100, "o" + style,
                color="tab:blue", label=f"hit ratio, {trace}")
        right.plot(part["cache_prompts"], part["prefill_gpu_hours"], "s" + style,
                   color="tab:orange", label=f"prefill GPU-hours, {trace}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cache size [prompts]")
    ax.set_ylabel("cache hit ratio [%]", color="tab:blue")
    right.set_ylabel("prefill GPU-hours (A10)", color="tab:orange")
    ax.legend(loc="upper left", fontsize=7)
    right.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    _save(out, fig, "cache_size")
    shown = data[["trace", "scope", "cache_prompts", "hit_ratio_requests", "prefill_gpu_hours",
                  "prefill_saving"]]
    out.text("report.md", "# Cache size (thesis Figure 6.7)\n\n" + _table(shown) + (
        "\nThesis (Marconi, session caches, 1,024 tokens): hit ratio from 1.3 % (2 prompts) to "
        "57.7 % (64 prompts), GPU time from 122.83 to 43.21 hours (MF11). A cache entry here "
        "holds one prompt's prefix; the thesis's memory estimate per session (eq. 6.2, 0.52 MB "
        "per token) uses all attention heads, 4× the GQA-aware 0.13 MB of Llama-3-8B.\n"))
    return {"data": data}


RUNNERS = {"accuracy": accuracy, "speed": speed, "kv-cache": kv_cache,
           "prefix-length": prefix_length, "cache-size": cache_size}
