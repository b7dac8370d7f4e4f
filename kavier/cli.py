"""``kavier`` command line: ``simulate`` and ``calibrate``.

Bad input (unknown files, columns, values, LLMs, GPUs) ends with one line ``error: ...`` on
standard error and exit status 2, never a traceback.

``kavier simulate`` of a Parquet or CSV trace does not import pandas (0.25–0.3 s, a third of the
whole command at 100,000 requests; see :mod:`archive.arrow`): what needs it (JSON Lines traces,
CSV files pyarrow cannot type, carbon traces, batching, calibration) imports it where it runs.
"""

from __future__ import annotations

import gc
from dataclasses import asdict
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np
import pyarrow as pa

import archive
from archive.errors import InputError, clean_errors
from kavier.batching import (
    ROUTERS,
    BatchingConfig,
    BatchSimulator,
    arrivals,
    energy_wh,
    goodput,
)
from kavier.cache import (
    POLICIES,
    SCOPES,
    VLLM_GPU_MEMORY_UTILIZATION,
    PrefixCache,
    PrefixCacheConfig,
    block_size_for,
    kv_pool_blocks,
)
from kavier.engine import Simulator
from kavier.engine import run as run_simulation
from kavier.library import gpu_library, llm_library
from kavier.opendc import DEFAULT_START
from kavier.output import run_folder
from kavier.power import POWER_MODELS, PowerModel
from kavier.run import FLUSH_ROWS, OUTPUT_FILES, ExportOptions, write_run
from kavier.stats import QUANTILES
from kavier.sustainability import CarbonTrace, Sustainability
from kavier.timing import TIMING_MODELS, TimingParams, make_timing
from tracer.smi import CAPTURE_FIELDS

if TYPE_CHECKING:
    import pandas as pd


def toolkit_version() -> str:
    """Installed version of the toolkit distribution."""
    try:
        return version("kavier-toolkit")
    except PackageNotFoundError:
        return "unknown"


@click.group()
@click.version_option(package_name="kavier-toolkit", prog_name="kavier")
def main():
    """Kavier: cache-aware simulation of LLM inference (performance, calibration)."""


def entry() -> None:
    """The ``kavier`` console script: :func:`main`, then ``gc.freeze()`` on the way out.

    At exit the interpreter garbage-collects every object still alive, among them the hundreds
    of thousands that numpy, pyarrow and pandas create on import; freezing them first skips
    that (about 0.1 s of every command on the 2-core dev machine). Every output file is closed
    by then, and objects are still freed by reference counting.
    """
    try:
        main()
    finally:
        gc.freeze()


def _print_summary(summary: dict) -> None:
    rows = [
        ("requests", f"{summary['n_requests']:,}"),
        ("input / output tokens", f"{summary['n_input_tokens']:,} / "
                                  f"{summary['n_output_tokens']:,}"),
        ("GPU-hours (prefill + decode)", f"{summary['gpu_hours']:.3f} "
         f"({summary['prefill_gpu_hours']:.3f} + {summary['decode_gpu_hours']:.3f})"),
        ("makespan", f"{summary['makespan_s']:.1f} s"),
        ("throughput (output / total)", f"{summary['output_throughput_tok_s']:.1f} / "
                                        f"{summary['total_throughput_tok_s']:.1f} tok/s"),
        ("mean queueing delay", f"{summary['mean_queue_s']:.2f} s"),
    ]
    for metric in ("service_s", "ttft_s", "tpot_s", "e2e_s"):
        values = [summary[f"p{q}_{metric}"] for q in QUANTILES]
        if values[0] is not None:
            rows.append((f"{metric[:-2].upper()} p50 / p90 / p99",
                         " / ".join(f"{v:.3f}" for v in values) + " s"))
    cache = summary.get("prefix_cache")
    if cache:
        rows.append(("prefix cache hit ratio", f"{cache['hit_ratio_lookups']:.4f} of lookups, "
                     f"{cache['hit_ratio_requests']:.4f} of requests "
                     f"({cache['hits']:,} hits, {cache['evictions']:,} evictions)"))
        rows.append(("token reuse ratio", f"{cache['token_reuse_ratio']:.4f}"))
        rows.append(("prefill GPU-hours saved", f"{summary['prefill_saved_gpu_hours']:.3f}"))
    energy = summary.get("sustainability")
    if energy:
        model = energy["power_model"]
        rows.append(("GPU energy (busy + idle)", f"{energy['energy_gpu_wh'] / 1000:.3f} kWh "
                     f"({energy['energy_busy_wh'] / 1000:.3f} + "
                     f"{energy['energy_idle_wh'] / 1000:.3f}), {model['name']} power model, "
                     f"{model['idle_w']:g}–{model['max_w']:g} W"))
        rows.append(("facility energy", f"{energy['energy_facility_wh'] / 1000:.3f} kWh "
                     f"(PUE {energy['pue']:g}), mean GPU power {energy['mean_power_w']:.1f} W"))
        if "co2_g" in energy:
            rows.append(("CO2", f"{energy['co2_g'] / 1000:.3f} kg ({energy['carbon_trace']})"))
    if summary["requests_kv_not_fitting"]:
        rows.append(("requests whose KV does not fit", f"{summary['requests_kv_not_fitting']:,}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


def _specs(llm: str, gpu: str, llm_lib: str | None, gpu_lib: str | None):
    return llm_library(llm_lib).get(llm), gpu_library(gpu_lib).get(gpu)


def _cache_blocks(value: str) -> str:
    if value in ("auto", "unlimited") or (value.isdigit() and int(value) > 0):
        return value
    raise click.BadParameter(f"expected a positive number of blocks, 'auto' or 'unlimited', "
                             f"got {value!r}")


def _prefix_cache(workload, policy, min_tokens, max_prompts, scope, block_size, cache_blocks,
                  llm_spec, gpu_spec, memory_utilization):
    if policy == "none":
        return None
    capacity = None
    if policy == "blocks" and workload.content is not None and cache_blocks != "unlimited":
        capacity = int(cache_blocks) if cache_blocks != "auto" else kv_pool_blocks(
            llm_spec, gpu_spec, block_size_for(block_size, workload.content), memory_utilization)
    return PrefixCache(PrefixCacheConfig(policy, min_tokens, max_prompts, scope, block_size,
                                         capacity), workload.content, workload.session_ids())


def batching_options(command):
    """The continuous-batching options of ``simulate`` and ``capacity`` (all default None:
    when none is given, ``simulate`` runs the thesis's one-at-a-time engine)."""
    options = [
        click.option("--replicas", type=click.IntRange(min=1), default=None,
                     help="Batching: GPU replicas behind the router."),
        click.option("--router", type=click.Choice(ROUTERS), default=None,
                     help="Batching: replica choice [default: least-outstanding]."),
        click.option("--max-num-seqs", type=click.IntRange(min=1), default=None,
                     help="Batching: requests running at once per replica [256]."),
        click.option("--max-num-batched-tokens", type=click.IntRange(min=1), default=None,
                     help="Batching: tokens per step [8192]."),
        click.option("--chunked-prefill/--no-chunked-prefill", default=None,
                     help="Batching: split prompts across steps [on]."),
        click.option("--kv-block-size", type=click.IntRange(min=1), default=None,
                     help="Batching: tokens per KV block [16]."),
        click.option("--activation-reserve-gib", type=click.FloatRange(min=0), default=None,
                     help="Batching: GPU memory kept for activations, out of the KV pool "
                          "[0; vLLM profiles it at start-up]."),
        click.option("--rate-scale", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Batching: divide arrival times by this (2 = twice the load)."),
        click.option("--poisson-rate", type=click.FloatRange(min=0, min_open=True),
                     default=None, help="Batching: replace arrivals by a Poisson process, req/s."),
        click.option("--slo-ttft", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Batching: TTFT SLO, s (goodput)."),
        click.option("--slo-tpot", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Batching: TPOT SLO, s (goodput)."),
        click.option("--steps/--no-steps", "write_steps", default=None,
                     help="Batching: also write steps.parquet (one row per engine step)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _batch_config(llm_spec, gpu_spec, memory_utilization, b: dict) -> BatchingConfig:
    block = b.get("kv_block_size") or 16
    defaults = BatchingConfig()
    return BatchingConfig(
        replicas=b.get("replicas") or 1, max_num_seqs=b.get("max_num_seqs") or
        defaults.max_num_seqs, max_num_batched_tokens=b.get("max_num_batched_tokens") or
        defaults.max_num_batched_tokens,
        chunked_prefill=True if b.get("chunked_prefill") is None else b["chunked_prefill"],
        block_size=block, pool_blocks=kv_pool_blocks(llm_spec, gpu_spec, block,
                                                     memory_utilization,
                                                     b.get("activation_reserve_gib") or 0.0),
        router=b.get("router") or "least-outstanding")


def _run_batched(workload, timing, cache, config, b, steps=None):
    requests = arrivals(workload.requests, b.get("rate_scale"), b.get("poisson_rate"))
    order = np.arange(len(requests))
    try:
        simulator = BatchSimulator(timing, config, cache)
        return (*simulator.run(requests, order, steps), simulator.cache_stats())
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _simulate_batched(workload, timing, cache, llm_spec, gpu_spec, power, memory_utilization,
                      output_folder, trace, b):
    config = _batch_config(llm_spec, gpu_spec, memory_utilization, b)
    steps = [] if b.get("write_steps") else None
    requests, summary, cache_stats = _run_batched(workload, timing, cache, config, b, steps)
    summary.update({
        "trace": str(trace), "llm": llm_spec.name, "gpu": gpu_spec.name, "mode": "batching",
        "batching": asdict(config), "goodput": goodput(requests, b.get("slo_ttft"),
                                                       b.get("slo_tpot")),
        "slo_ttft_s": b.get("slo_ttft"), "slo_tpot_s": b.get("slo_tpot"),
        "energy_gpu_wh": energy_wh(summary, power), "power_model": power.to_dict(),
        "prefix_cache": cache_stats,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "toolkit_version": toolkit_version()})
    with run_folder(output_folder) as out:
        for name in OUTPUT_FILES:           # whatever an earlier run left here
            (out.folder / name).unlink(missing_ok=True)
        out.table("requests.parquet", pa.Table.from_pandas(requests, preserve_index=False))
        if steps is not None:
            import pandas as pd

            out.table("steps.parquet", pa.Table.from_pandas(pd.DataFrame(steps, columns=[
                "replica", "start_s", "duration_s", "n_seqs", "prefill_tokens",
                "decode_tokens", "kv_blocks_used"]), preserve_index=False))
        out.json("summary.json", summary)
    click.echo(f"{llm_spec.name} on {config.replicas} × {gpu_spec.name}, continuous batching "
               f"({config.router}, {config.max_num_seqs} seqs, {config.max_num_batched_tokens} "
               f"tokens/step, KV pool {config.pool_blocks:,} blocks): {trace}")
    for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        values = [summary[f"p{q}_{metric}"] for q in QUANTILES]
        if values[0] is not None:
            click.echo(f"{metric[:-2].upper() + ' p50 / p90 / p99':<30}"
                       + " / ".join(f"{v:.3f}" for v in values) + " s")
    click.echo(f"{'mean queueing delay':<30}{summary['mean_queue_s']:.3f} s")
    click.echo(f"{'preemptions':<30}{summary['preemptions']:,}")
    click.echo(f"{'goodput':<30}{summary['goodput']:.4f}")
    click.echo(f"{'GPU energy':<30}{summary['energy_gpu_wh'] / 1000:.3f} kWh")
    click.echo(f"wrote requests.parquet{', steps.parquet' if steps is not None else ''} and "
               f"summary.json in {output_folder}")


def _power_model(name, idle_w, max_w, shape, section, gpu_spec) -> PowerModel:
    """Power model from the options, else the profile's power section, else linear with the
    GPU library's idle and maximum power."""
    fitted = (section or {}).get("model", {})
    use_fit = name is None or name == fitted.get("name")
    base = fitted if (fitted and use_fit) else {}
    return PowerModel(name or base.get("name", "linear"),
                      idle_w if idle_w is not None else base.get("idle_w", gpu_spec.idle_power_w),
                      max_w if max_w is not None else base.get("max_w", gpu_spec.max_power_w),
                      shape if shape is not None else base.get("shape"))


@main.command()
@click.option("--trace", required=True,
              help="Workload: CSV/Parquet/JSONL file or bundled dataset name "
                   "(e.g. azure-llm-inference-2023-conv).")
@click.option("--llm", default=None, help="LLM from the library [default: Llama-3-8B, or the "
                                          "profile's].")
@click.option("--gpu", default=None, help="GPU from the library [default: A10, or the "
                                          "profile's].")
@click.option("--output-folder", default="runs/simulation", show_default=True,
              type=click.Path(file_okay=False))
@click.option("--kv-cache", type=click.Choice(["on", "off"]), default="on", show_default=True)
@click.option("--export-rate", type=click.FloatRange(min=0), default=0.1, show_default=True,
              help="Snapshot interval in seconds; 0 writes run-length fragments.")
@click.option("--flush-size", type=click.IntRange(min=1), default=FLUSH_ROWS, show_default=True,
              help="Fragment rows per written row group (bounds memory).")
@click.option("--fragments/--no-fragments", default=True, show_default=True,
              help="Write fragments.parquet (--no-fragments: task level only).")
@click.option("--opendc/--no-opendc", default=True, show_default=True,
              help="Write the OpenDC workload (opendc/tasks.parquet, opendc/fragments.parquet).")
@click.option("--start-time", "--start", "start_time", default=str(DEFAULT_START),
              show_default=True, help="Wall-clock instant of simulated time 0 (ISO 8601; UTC "
              "unless a zone is given), for OpenDC and the carbon trace.")
@click.option("--power-model", type=click.Choice(POWER_MODELS), default=None,
              help="GPU power vs utilization (thesis Table 4.1) [default: the profile's "
              "calibrated model, else linear]. Requests and the summary always carry energy; "
              "fragments get power_w, energy_wh (and co2_g) once a power model, power profile, "
              "carbon trace or PUE is given.")
@click.option("--idle-power-w", type=click.FloatRange(min=0), default=None,
              help="P_idle, W [default: the profile's, else the GPU library's].")
@click.option("--max-power-w", type=click.FloatRange(min=0), default=None,
              help="P_max, W [default: the profile's, else the GPU library's].")
@click.option("--power-shape", type=click.FloatRange(min=0, min_open=True), default=None,
              help="r of mse, α of the asymptotic models [default 1.4 / 0.3, or the profile's].")
@click.option("--power-profile", type=click.Path(dir_okay=False), default=None,
              help="Profile with a power section (from kavier calibrate-power).")
@click.option("--carbon-trace", default=None,
              help="Carbon intensity: NL, DE, FR, BE (bundled ENTSO-E 2022) or a "
              "Parquet/CSV file with timestamp, carbon_intensity [default: no CO2].")
@click.option("--pue", type=click.FloatRange(min=1), default=1.0, show_default=True,
              help="Power usage effectiveness: facility energy / IT energy.")
@click.option("--timing-model", type=click.Choice(list(TIMING_MODELS)), default=None,
              help="[default: the profile's, else thesis]")
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False), default=None,
              help="Calibrated profile (JSON) whose parameters replace the defaults.")
@click.option("--utilization-cap", type=click.FloatRange(min=0, min_open=True, max=1),
              default=1.0, show_default=True, help="GPU utilization while inferring.")
@click.option("--arrivals/--back-to-back", default=True, show_default=True,
              help="Honour the trace's arrival times (queueing) or run requests back to back.")
@click.option("--prefix-cache-policy", type=click.Choice(POLICIES), default="none",
              show_default=True, help="prefill/full: exact match on the first "
              "--prefix-cache-min-tokens (thesis Listing 4.2); blocks: vLLM-style reuse of the "
              "longest cached run of leading blocks. See docs/prefix-cache.md.")
@click.option("--prefix-cache-min-tokens", type=click.IntRange(min=1), default=256,
              show_default=True, help="Exact-match prefix length, tokens.")
@click.option("--max-cached-prompts", type=click.IntRange(min=1), default=None,
              help="Exact-match capacity per scope unit, LRU [default: unlimited].")
@click.option("--cache-scope", type=click.Choice(SCOPES), default="global", show_default=True,
              help="session: a request hits only entries of its own session_id.")
@click.option("--block-size", type=int, default=None,
              help="Tokens per block [default: the trace's (Mooncake 512), else vLLM's 16].")
@click.option("--cache-blocks", default="auto", show_default=True, callback=lambda c, p, v:
              _cache_blocks(v), help="blocks policy: pool size in blocks, 'auto' (GPU memory "
              "left after the weights, as vLLM sizes it) or 'unlimited'.")
@click.option("--gpu-memory-utilization", type=click.FloatRange(min=0, min_open=True, max=1),
              default=VLLM_GPU_MEMORY_UTILIZATION, show_default=True,
              help="Share of GPU memory usable for weights and KV (vLLM's default).")
@click.option("--llm-library", type=click.Path(dir_okay=False), default=None,
              help="Extra LLM entries (TOML/JSON).")
@click.option("--gpu-library", type=click.Path(dir_okay=False), default=None,
              help="Extra GPU entries (TOML/JSON).")
@batching_options
@clean_errors
def simulate(trace, llm, gpu, output_folder, kv_cache, export_rate, flush_size, fragments,
             opendc, start_time, power_model, idle_power_w, max_power_w, power_shape,
             power_profile, carbon_trace, pue, timing_model, profile_path, utilization_cap,
             arrivals,
             prefix_cache_policy, prefix_cache_min_tokens, max_cached_prompts, cache_scope,
             block_size, cache_blocks, gpu_memory_utilization, llm_library, gpu_library,
             **batching):
    """Simulate a workload trace on one GPU and write requests, fragments, the OpenDC workload
    and a summary; with any batching option (--replicas, --max-num-seqs, ...), serve it with
    continuous batching on one or more replicas instead (docs/batching.md)."""
    from calibrate.profile import Profile

    params, power_section = TimingParams(), None
    if power_profile:
        power_section = Profile.read_power(power_profile)
    if profile_path:
        profile = Profile.read(profile_path)
        power_section = power_section or profile.power
        if gpu and gpu.lower() != profile.gpu.lower():
            raise InputError(f"profile is for GPU {profile.gpu}, not {gpu}", path=profile_path,
                             field="gpu")
        llm, gpu = llm or profile.llm, profile.gpu
        timing_model = timing_model or profile.timing_model
        params = profile.params
    llm_spec, gpu_spec = _specs(llm or "Llama-3-8B", gpu or "A10", llm_library, gpu_library)
    timing = make_timing(timing_model or "thesis", llm_spec, gpu_spec, params, kv_cache == "on")
    try:
        start = datetime.fromisoformat(start_time)
    except ValueError:
        raise InputError(f"not an ISO 8601 instant: {start_time!r}", field="start-time") from None
    start = start.replace(tzinfo=UTC) if start.tzinfo is None else start
    workload = archive.read_trace(trace)
    cache = _prefix_cache(workload, prefix_cache_policy, prefix_cache_min_tokens,
                          max_cached_prompts, cache_scope, block_size, cache_blocks, llm_spec,
                          gpu_spec, gpu_memory_utilization)
    power = _power_model(power_model, idle_power_w, max_power_w, power_shape, power_section,
                         gpu_spec)
    if any(v is not None for v in batching.values()):
        return _simulate_batched(workload, timing, cache, llm_spec, gpu_spec, power,
                                 gpu_memory_utilization, output_folder, trace, batching)
    carbon = None
    if carbon_trace:
        from archive.carbon import read_carbon

        carbon = CarbonTrace(read_carbon(carbon_trace), start, str(carbon_trace))
    sustainability = Sustainability(power, carbon, pue, utilization_cap)
    sim = Simulator(timing, cache, arrivals, gpu_spec.memory_bytes * gpu_memory_utilization,
                    sustainability)
    explicit_energy = any(x is not None for x in (power_model, power_profile, carbon_trace,
                                                   power_section)) or pue != 1.0
    options = ExportOptions(export_rate, fragments, opendc, flush_size, utilization_cap, start,
                            fragment_energy=explicit_energy)
    with run_folder(output_folder) as out:
        try:
            rows = write_run(run_simulation(workload, sim), sim, out, options,
                             workload.table.num_rows)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        summary = {
            "trace": str(trace), "llm": llm_spec.name, "gpu": gpu_spec.name,
            "timing_model": timing.name, "kv_cache": kv_cache, "params": params.to_dict(),
            "profile": profile_path, "export_rate_s": export_rate,
            "kv_bytes_per_token": sim.kv_bytes_per_token,
            "gpu_memory_utilization": gpu_memory_utilization, **sim.summary(),
            "rows_written": rows, "opendc_start_time": str(start),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "toolkit_version": toolkit_version(),
        }
        out.json("summary.json", summary)
    click.echo(f"{llm_spec.name} on {gpu_spec.name}, {timing.name} model, KV cache {kv_cache}, "
               f"prefix cache {prefix_cache_policy}: {trace}")
    _print_summary(summary)
    click.echo(f"wrote {', '.join(rows)} and summary.json in {output_folder}")


def _load_measurements(dataset: str) -> tuple[pd.DataFrame, str]:
    """Measurements from a bundled dataset name, a Parquet file, or a dataset folder."""
    path = Path(dataset)
    if not path.exists():
        if dataset not in archive.list_datasets():
            raise InputError(f"no such file or bundled dataset (datasets: "
                             f"{', '.join(archive.list_datasets())})", path=dataset)
        return archive.load(dataset), dataset
    if path.is_dir():
        path = path / "measurements.parquet"
    import pandas as pd

    try:
        return pd.read_parquet(path), str(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"cannot read measurements: {str(exc).splitlines()[0]}",
                         path=path) from None


def _single(df: pd.DataFrame, column: str, given: str | None, source: str) -> str:
    if given:
        return given
    values = df[column].dropna().unique() if column in df.columns else []
    if len(values) != 1:
        raise InputError(f"cannot tell the {column} from the data ({list(values)}); "
                         f"pass --{'llm' if column == 'model' else column}", path=source)
    return str(values[0])


@main.command()
@click.option("--dataset", default="a10-surf-vllm-llama3-8b", show_default=True,
              help="Measurements: bundled dataset name, Parquet file or dataset folder.")
@click.option("--setup-id", default=None, help="Use only rows of this setup_id.")
@click.option("--llm", default=None, help="[default: the data's model column]")
@click.option("--gpu", default=None, help="[default: the data's gpu column]")
@click.option("--timing-model", type=click.Choice(list(TIMING_MODELS)), default="roofline",
              show_default=True)
@click.option("--attention-efficiency", type=click.FloatRange(min=0, min_open=True, max=1),
              default=1.0, show_default=True,
              help="Roofline: fixed attention efficiency (see docs/calibration.md).")
@click.option("--output-folder", default="runs/calibration", show_default=True,
              type=click.Path(file_okay=False))
@click.option("--llm-library", type=click.Path(dir_okay=False), default=None)
@click.option("--gpu-library", type=click.Path(dir_okay=False), default=None)
@clean_errors
def calibrate(dataset, setup_id, llm, gpu, timing_model, attention_efficiency, output_folder,
              llm_library, gpu_library):
    """Fit the timing model to measurements; write a profile and a validation report."""
    from archive.datasets import content_sha256
    from calibrate.batching import concurrent_groups, fit_batching
    from calibrate.estimator import TimingRegressor
    from calibrate.fit import calibrate as run_calibration
    from calibrate.profile import Profile
    from calibrate.report import write_report

    df, source = _load_measurements(dataset)
    if setup_id:
        df = df[df.get("setup_id") == setup_id]
        if df.empty:
            raise InputError(f"no rows with setup_id {setup_id!r}", path=source)
    llm_spec, gpu_spec = _specs(_single(df, "model", llm, source),
                                _single(df, "gpu", gpu, source), llm_library, gpu_library)
    estimator = TimingRegressor(
        llm=llm_spec, gpu=gpu_spec, timing_model=timing_model,
        attention_efficiency=attention_efficiency if timing_model == "roofline" else None)
    reference = None
    if dataset == "a10-surf-vllm-llama3-8b":
        from archive.importers.a10_surf import table_medians

        reference = table_medians(archive.dataset_dir(dataset))
    result = run_calibration(df, estimator, source, reference)
    params, batching = result.estimator.params_, None
    if timing_model == "roofline" and concurrent_groups(df):
        fitted, batching = fit_batching(df, make_timing("roofline", llm_spec, gpu_spec, params))
        params = fitted.params
        result.scores["batching"] = batching
    engine = " ".join(str(_single(df, c, None, source)) for c in ("engine", "engine_version")
                      if c in df.columns)
    profile = Profile(
        gpu=gpu_spec.name, llm=llm_spec.name, engine=engine, timing_model=timing_model,
        params=params, mape_pct=result.scores, datasets=[dataset],
        data_sha256=content_sha256(df), cv="leave-one-size-out over per-size medians",
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        toolkit_version=toolkit_version())
    with run_folder(output_folder) as out:
        write_report(out, result, profile)
        out.json("summary.json", {"profile": "profile.json", "mape_pct": result.scores})
    s = result.scores
    click.echo(f"calibrated {timing_model} model for {llm_spec.name} on {gpu_spec.name} "
               f"({len(df)} requests from {dataset})")
    click.echo(f"{'MAPE [%]':<32}{'prefill':>10}{'decode':>10}   (per-size median | "
               "per request)")
    for key, label in (("fit", "calibrated, on the fit"), ("heldout", "calibrated, held out"),
                       ("thesis_defaults", "thesis defaults")):
        cells = [f"{s[key][st]['per_size_median']:.2f} | {s[key][st]['per_request']:.2f}"
                 for st in ("prefill", "decode")]
        click.echo(f"{label:<32}{cells[0]:>15}{cells[1]:>17}")
    t = s["thesis_defaults_thesis_scoring"]
    click.echo(f"{'thesis defaults, thesis scoring':<32}{t['prefill']:>10.2f}{t['decode']:>10.2f}")
    if batching:
        b = batching
        click.echo(f"batching overheads from {b['groups']} concurrent groups: step "
                   f"{b['batch_step_overhead_s']:.4g} s, per extra sequence "
                   f"{b['batch_seq_overhead_s']:.4g} s; MAPE {b['mape_before_pct']:.2f} -> "
                   f"{b['mape_after_pct']:.2f} %")
    click.echo("parameters: " + ", ".join(f"{k}={v:.4g}" for k, v in params.to_dict().items()
                                          if v is not None))
    click.echo(f"wrote {Path(output_folder) / 'profile.json'} and the validation report")


_EFFICIENCY_ROWS = [
    ("cost", "cost ({currency})", "{:.4f}"),
    ("tokens", "tokens (prefill + decode)", "{:,}"),
    ("busy_s", "busy time ΔT_P + ΔT_D (s)", "{:.1f}"),
    ("financial_efficiency", "eq. 4.8  E_f ({currency}·s/token)", "{:.6g}"),
    ("energy_efficiency_wh_s_per_token", "eq. 4.10 E_s energy (Wh·s/token)", "{:.6g}"),
    ("co2_efficiency_g_s_per_token", "eq. 4.10 E_s CO2 (g·s/token)", "{:.6g}"),
    ("cost_per_mtok", "cost per million tokens ({currency})", "{:.4f}"),
    ("energy_wh_per_mtok", "Wh per million tokens", "{:.2f}"),
    ("co2_g_per_mtok", "gCO2 per million tokens", "{:.2f}"),
    ("tokens_per_j", "tokens per joule", "{:.4f}"),
]


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--price-per-gpu-hour", type=click.FloatRange(min=0), default=1.2,
              show_default=True, help="Price of one GPU-hour (thesis: 1.2 €/h for an A10).")
@click.option("--currency", default="EUR", show_default=True)
@click.option("--opendc-power", "opendc_power", multiple=True, type=click.Path(dir_okay=False),
              help="OpenDC powerSource.parquet whose energy and CO2 replace the run's; once "
                   "per run, in order.")
@clean_errors
def efficiency(run_dirs, price_per_gpu_hour, currency, opendc_power):
    """Efficiency report of one simulated run, or of two and their ratios (eqs. 4.8–4.11)."""
    from kavier.efficiency import ratios, read_run, report, with_opendc_power

    if len(run_dirs) > 2:
        raise InputError("give one run folder, or two to compare")
    if len(opendc_power) > len(run_dirs):
        raise InputError("more --opendc-power files than runs", field="opendc-power")
    totals = [read_run(d) for d in run_dirs]
    totals = [with_opendc_power(t, p) if p else t for t, p in
              zip(totals, list(opendc_power) + [None] * len(totals), strict=False)]
    reports = [report(t, price_per_gpu_hour) for t in totals]
    if len(reports) == 2:
        reports.append(ratios(reports[0], reports[1]))
    heads = [str(d) for d in run_dirs] + (["ratio 1/2 (eq. 4.9/4.11)"] if len(run_dirs) == 2
                                           else [])
    click.echo(f"{'metric':<40}" + "".join(f"{h[-28:]:>30}" for h in heads))
    for key, label, fmt in _EFFICIENCY_ROWS:
        cells = []
        for i, r in enumerate(reports):
            value = r.get(key)
            cells.append("—" if value is None else (f"{value:.4g}" if i == 2 else
                                                    fmt.format(value)))
        click.echo(f"{label.format(currency=currency):<40}" + "".join(f"{c:>30}"
                                                                       for c in cells))


@main.command("calibrate-power")
@click.argument("capture", type=click.Path(dir_okay=False))
@click.option("--fields", default=",".join(CAPTURE_FIELDS), show_default=True,
              help="nvidia-smi --query-gpu fields of the capture, in order.")
@click.option("--gpu", default=None, help="GPU the capture is from (recorded in the profile).")
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False), default=None,
              help="Timing profile to add the power section to [default: write a power-only "
                   "profile in the output folder].")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="Contiguous cross-validation blocks.")
@click.option("--output-folder", default="runs/power", show_default=True,
              type=click.Path(file_okay=False))
@clean_errors
def calibrate_power(capture, fields, gpu, profile_path, folds, output_folder):
    """Fit the power models of thesis Table 4.1 to nvidia-smi samples and rank them by MAPE."""
    from calibrate.power import calibrate_power as fit
    from calibrate.power_report import power_section, write_power_report
    from calibrate.profile import Profile
    from tracer.smi import read_capture

    samples = read_capture(capture, tuple(f.strip() for f in fields.split(",")))
    result = fit(samples, folds)
    section = power_section(result, capture, samples, gpu)
    with run_folder(output_folder) as out:
        write_power_report(out, result, samples, section)
        if profile_path:
            profile = Profile.read(profile_path)
            profile.power = section
            profile.write(profile_path)
        out.json("summary.json", {"power": section,
                                  "profile": profile_path or "power_profile.json"})
    click.echo(f"{'model':<16}{'P_idle W':>10}{'P_max W':>10}{'shape':>8}"
               f"{'MAPE fit %':>12}{'held out %':>12}")
    for row in result.ranking.itertuples():
        shape = "" if row.shape != row.shape or row.shape is None else f"{row.shape:.3g}"
        click.echo(f"{row.model:<16}{row.idle_w:>10.1f}{row.max_w:>10.1f}{shape:>8}"
                   f"{row.mape_fit_pct:>12.2f}{row.mape_heldout_pct:>12.2f}")
    if result.clock:
        c = result.clock
        click.echo(f"{result.best.name} with SM clock (γ = {c['gamma']:.2f}): MAPE fit "
                   f"{c['mape_fit_pct']:.2f} %, held out {c['mape_heldout_pct']:.2f} %")
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"best: {result.best.name}; wrote {Path(output_folder)}/power_profile.json, "
               f"power_fit.png, ranking.csv" + (f" and the power section of {profile_path}"
                                                if profile_path else ""))


@main.command()
@click.argument("experiment", type=click.Choice(["all", "accuracy", "speed", "kv-cache",
                                                 "prefix-length", "cache-size"]))
@click.option("--output-folder", default="runs/reproduce", show_default=True,
              type=click.Path(file_okay=False), help="One subfolder per experiment.")
@click.option("--scheduler", default=None,
              help="Dask scheduler address (tcp://host:8786) for the sweeps [default: local "
                   "worker processes].")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Local worker processes [default: one per CPU].")
@click.option("--quick", is_flag=True, help="Small inputs (for tests and a first look).")
@clean_errors
def reproduce(experiment, output_folder, scheduler, workers, quick):
    """Reproduce the thesis's experiments (Figures 6.2–6.7, Table 6.9): data, figures, report."""
    from kavier.reproduce import EXPERIMENTS, RUNNERS

    for name in EXPERIMENTS if experiment == "all" else (experiment,):
        folder = Path(output_folder) / name
        start = datetime.now(UTC)
        with run_folder(folder) as out:
            RUNNERS[name](out, quick=quick, scheduler=scheduler, workers=workers)
            out.json("summary.json", {"experiment": name, "quick": quick,
                                      "started": start.isoformat(timespec="seconds"),
                                      "toolkit_version": toolkit_version()})
        click.echo(f"{name}: wrote {folder}/report.md and its data and figures")


@main.command()
@click.option("--trace", required=True, help="Workload: file, dataset folder or bundled name.")
@click.option("--llm", default="Llama-3-8B", show_default=True)
@click.option("--gpu", default="A100-80GB", show_default=True)
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False), default=None,
              help="Calibrated profile (roofline) whose parameters replace the defaults.")
@click.option("--percentile", type=click.FloatRange(0, 100), default=99.0, show_default=True,
              help="The SLOs hold at this percentile of TTFT and TPOT.")
@click.option("--max-replicas", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--price-per-gpu-hour", type=click.FloatRange(min=0), default=1.2,
              show_default=True)
@click.option("--gpu-memory-utilization", type=click.FloatRange(min=0, min_open=True, max=1),
              default=VLLM_GPU_MEMORY_UTILIZATION, show_default=True)
@batching_options
@clean_errors
def capacity(trace, llm, gpu, profile_path, percentile, max_replicas, price_per_gpu_hour,
             gpu_memory_utilization, **batching):
    """Smallest number of replicas whose TTFT and TPOT meet the SLOs at a percentile
    (doubling, then bisection over simulations), and its cost per million tokens."""
    from calibrate.profile import Profile

    if batching.get("slo_ttft") is None and batching.get("slo_tpot") is None:
        raise InputError("give --slo-ttft and/or --slo-tpot", field="slo-ttft")
    params = Profile.read(profile_path).params if profile_path else TimingParams()
    llm_spec, gpu_spec = _specs(llm, gpu, None, None)
    timing = make_timing("roofline", llm_spec, gpu_spec, params)
    workload = archive.read_trace(trace)
    tried: dict[int, dict] = {}

    def meets(n: int) -> bool:
        config = _batch_config(llm_spec, gpu_spec, gpu_memory_utilization,
                               {**batching, "replicas": n})
        requests, summary, _ = _run_batched(workload, timing, None, config, batching)
        ok = True
        for slo, column in (("slo_ttft", "ttft_s"), ("slo_tpot", "tpot_s")):
            if batching.get(slo) is not None:
                value = float(np.nanpercentile(requests[column], percentile))
                ok &= value <= batching[slo]
                summary[f"pct_{column}"] = value
        tried[n] = {**summary, "ok": ok}
        click.echo(f"{n:>5} replicas: TTFT p{percentile:g} "
                   f"{summary.get('pct_ttft_s', float('nan')):.3f} s, TPOT p{percentile:g} "
                   f"{summary.get('pct_tpot_s', float('nan')):.4f} s -> "
                   f"{'meets' if ok else 'misses'} the SLOs")
        return ok

    low, high = 0, 1
    while not meets(high):
        low, high = high, high * 2
        if high > max_replicas:
            raise InputError(f"even {low} replicas miss the SLOs (raise --max-replicas)")
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if meets(mid) else (mid, high)
    s = tried[high]
    tokens = int(workload.requests["n_input_tokens"].sum()
                 + workload.requests["n_output_tokens"].sum())
    cost = price_per_gpu_hour * high * s["makespan_s"] / 3600.0
    click.echo(f"smallest: {high} × {gpu_spec.name}; cost {cost:.2f} per run, "
               f"{cost / tokens * 1e6:.4f} per million tokens at {price_per_gpu_hour:g}/GPU-h")
