"""``kavier`` command line: ``simulate`` and ``calibrate``.

Bad input (unknown files, columns, values, LLMs, GPUs) ends with one line ``error: ...`` on
standard error and exit status 2, never a traceback.

``kavier simulate`` of a Parquet or CSV trace does not import pandas (0.25–0.3 s, a third of the
whole command at 100,000 requests; see :mod:`archive.arrow`): what needs it (JSON Lines traces,
CSV files pyarrow cannot type, carbon traces, batching, calibration) imports it where it runs.
"""

from __future__ import annotations

import gc
import math
from dataclasses import asdict, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np
import pyarrow as pa

import archive
from archive.errors import InputError, Number, clean_errors
from archive.provenance import toolkit_version
from archive.smi import CAPTURE_FIELDS
from calibrate.profile import shipped_profiles
from kavier.export.opendc import DEFAULT_START
from kavier.export.output import run_folder
from kavier.export.run import (
    ROW_LIMIT,
    ExportOptions,
    RunOutput,
    check_fragment_rows,
    replica_memory_bytes,
)
from kavier.models.library import KV_CACHE_DTYPES, gpu_library, llm_library, with_kv_cache_dtype
from kavier.models.power import POWER_MODELS, PowerModel
from kavier.models.timing import TIMING_MODELS, make_timing
from kavier.sim.config import VLLM_BLOCK_SIZE, EngineConfig, flag
from kavier.sim.prefix import POLICIES, SCOPES, PrefixCache, PrefixCacheConfig
from kavier.sim.simulation import served_sizes
from kavier.sim.simulation import simulate as run_engine
from kavier.sim.stats import QUANTILES
from kavier.sim.sustainability import MEMORY_BOUND_UTILIZATION, CarbonTrace, Sustainability

if TYPE_CHECKING:
    import pandas as pd


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


def significant(value: float, digits: int = 4) -> str:
    """``value`` to ``digits`` significant digits, without an exponent (``11,700``,
    ``0.1652``): the run summaries' quantile sketch is exact to 1e-4 relative, so four digits
    are all true and no more are printed."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    places = digits - 1 - math.floor(math.log10(abs(value)))
    return f"{round(value, places):,.{max(places, 0)}f}"


def _offered_load_row(summary: dict) -> list[tuple[str, str]]:
    """The offered load (:mod:`kavier.sim.load`) in numbers and words; none back to back."""
    rho = summary.get("offered_load")
    if rho is None:
        return []
    b = summary["offered_load_decode_batch"]
    how = (f"at best batching (decode batch {b})" if summary["offered_load_batched"]
           else "one request at a time")
    verdict = ("more than the replicas can serve: the queue grows while requests arrive"
               if rho >= 1 else "within capacity")
    per_replica = summary["gpus"] // summary["replicas"]
    unit = ("GPU-hours" if per_replica == 1
            else f"replica-hours ({per_replica} GPUs each)")
    return [("offered load", f"{rho:.2f} — {summary['service_demand_s'] / 3600:.3g} {unit} "
             f"of work {how} arriving over {summary['arrival_span_s'] / 3600:.3g} h on "
             f"{summary['replicas']} replica(s); {verdict}")]


def _print_summary(summary: dict) -> None:
    n = summary["n_requests"]
    rows = [
        ("requests (finished / failed)", f"{n:,} ({summary['n_finished']:,} / "
                                          f"{summary['n_failed']:,})"),
        ("input / output tokens", f"{summary['n_input_tokens']:,} / "
                                  f"{summary['n_output_tokens']:,}"),
        ("GPU-hours busy (prefill + decode)", f"{summary['gpu_hours']:.3f} "
         f"({summary['prefill_gpu_hours']:.3f} + {summary['decode_gpu_hours']:.3f}) of "
         f"{summary['provisioned_gpu_hours']:.3f} provisioned"),
        ("makespan", f"{summary['makespan_s']:.1f} s"),
        *_offered_load_row(summary),
        ("mean queueing delay", f"{summary['mean_queue_s']:.2f} s" if n else "—"),
        ("preemptions", f"{summary['preemptions']:,}"),
    ]
    if summary["queue_last_tenth_s"] is not None:
        rows.append(("mean queue, first / last tenth", f"{summary['queue_first_tenth_s']:.3g}"
                     f" / {summary['queue_last_tenth_s']:.3g} s" + (
                         ": BACKLOG — arrivals outpace service for the whole trace, so the "
                         "latencies measure the queue, not serving (add --replicas, or see "
                         "kavier capacity)" if summary["backlog"] else "")))
    if summary["output_throughput_tok_s"] is not None:
        rows.append(("throughput (output / total)", f"{summary['output_throughput_tok_s']:.1f}"
                     f" / {summary['total_throughput_tok_s']:.1f} tok/s"))
    if summary["mfu"] is not None:
        rows.append(("MFU / MBU (busy time)", f"{summary['mfu']:.3f} / {summary['mbu']:.3f}"))
    if summary.get("comm_share"):
        rows.append(("collectives (share of busy time)", f"{summary['comm_share']:.3f}"))
    for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        values = [summary[f"p{q}_{metric}"] for q in QUANTILES]
        if values[0] is not None:
            rows.append((f"{metric[:-2].upper()} p50 / p90 / p99",
                         " / ".join(significant(v) for v in values) + " s"))
    if summary["slo_ttft_s"] is not None or summary["slo_tpot_s"] is not None:
        rows.append(("goodput (requests meeting the SLOs)", f"{summary['goodput']:.4f}"))
    cache = summary.get("prefix_cache")
    if cache:
        rows.append(("prefix cache hit rate (tokens)", f"{cache['hit_rate_tokens']:.4f} "
                     f"({cache['hits_tokens']:,} of {cache['queries_tokens']:,} queried); "
                     f"requests with a hit {cache['hit_rate_requests']:.4f}"))
    energy = summary["sustainability"]
    model = energy["power_model"]
    rows.append(("GPU energy (busy + idle)", f"{energy['energy_gpu_wh'] / 1000:.4g} kWh "
                 f"({energy['energy_busy_wh'] / 1000:.4g} + "
                 f"{energy['energy_idle_wh'] / 1000:.4g}), {model['name']} power model, "
                 f"{model['idle_w']:g}–{model['max_w']:g} W"))
    rows.append(("facility energy", f"{energy['energy_facility_wh'] / 1000:.4g} kWh "
                 f"(PUE {energy['pue']:g})"))
    if "co2_g" in energy:
        rows.append(("CO2", f"{energy['co2_g'] / 1000:.4g} kg ({energy['carbon_trace']})"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


def _specs(llm: str, gpu: str, llm_lib: str | None, gpu_lib: str | None):
    return llm_library(llm_lib).get(llm), gpu_library(gpu_lib).get(gpu)


def _given(name: str) -> bool:
    """Whether the option ``name`` was given on the command line (not its default)."""
    source = click.get_current_context().get_parameter_source(name)
    return source not in (None, click.core.ParameterSource.DEFAULT)


def _reject_unused(pairs) -> None:
    """One-line error for the first option given where it would have no effect:
    ``pairs`` of (parameter name, condition under which it is unused, reason)."""
    for name, unused, why in pairs:
        if unused and _given(name):
            raise InputError(f"{flag(name)} has no effect {why}", field=flag(name)[2:])


def engine_options(command):
    """Click options for every field of :class:`~kavier.sim.config.EngineConfig`, with its
    default and help text (the dataclass is the one home of both)."""
    for f in reversed(fields(EngineConfig)):
        meta, default = f.metadata, f.default
        name = flag(f.name)
        if f.name == "back_to_back":
            option = click.option("--back-to-back/--arrivals", "back_to_back", default=default,
                                  show_default=True, help=meta["help"])
        elif f.name == "chunked_prefill":
            option = click.option("--chunked-prefill/--no-chunked-prefill", f.name,
                                  default=None, help=meta["help"])
        elif f.type in (bool, "bool"):
            option = click.option(name, f.name, is_flag=True, default=default,
                                  help=meta["help"])
        elif "choices" in meta:
            option = click.option(name, f.name, type=click.Choice(meta["choices"]),
                                  default=default, show_default=True, help=meta["help"])
        else:
            kind = click.IntRange if "int" in str(f.type) else Number
            bounds = {"min": meta.get("min"), "max": meta.get("max")}
            if kind is Number:
                bounds["min_open"] = bool(meta.get("min_open"))
            option = click.option(name, f.name, type=kind(**bounds), default=default,
                                  show_default=default is not None, help=meta["help"])
        command = option(command)
    return command


def _engine_config(options: dict, replicas_searched: bool = False) -> EngineConfig:
    """The engine configuration from the options; ``replicas_searched`` (capacity) keeps
    ``--router``, which its candidates of several replicas use."""
    config = EngineConfig(**{f.name: options.pop(f.name) for f in fields(EngineConfig)})
    fixed = config.num_gpu_blocks is not None
    _reject_unused([
        ("router", config.replicas == 1 and not replicas_searched, "with one replica"),
        ("gpu_memory_utilization", fixed, "with --num-gpu-blocks"),
        ("activation_reserve_gib", fixed, "with --num-gpu-blocks"),
    ])
    return config


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


def _arrivals(table: pa.Table, rate_scale, poisson_rate, seed, back_to_back) -> pa.Table:
    """The trace with arrival times rescaled (``arrival_s / rate_scale``) or replaced by a
    seeded Poisson process of ``poisson_rate`` requests/s."""
    if (rate_scale or poisson_rate) and back_to_back:
        raise InputError("--rate-scale and --poisson-rate set arrival times; --back-to-back "
                         "ignores them", field="back-to-back")
    if rate_scale and poisson_rate:
        raise InputError("give --rate-scale or --poisson-rate, not both", field="rate-scale")
    from archive.arrow import column, from_numpy

    if poisson_rate:
        gaps = np.random.default_rng(seed).exponential(1.0 / poisson_rate, table.num_rows)
        arrival = np.cumsum(gaps) - (gaps[0] if gaps.size else 0.0)
    elif rate_scale:
        if "arrival_s" not in table.column_names:
            raise InputError("--rate-scale needs arrival times in the trace",
                             field="rate-scale")
        arrival = column(table, "arrival_s", np.float64) / rate_scale
    else:
        return table
    table = table.drop_columns([c for c in ("arrival_s",) if c in table.column_names])
    return table.append_column("arrival_s", from_numpy(arrival))


def _read_profile(path):
    """:meth:`calibrate.profile.Profile.read`, with a one-line warning on stderr when the
    profile was fitted against another roofline revision (:meth:`Profile.stale`)."""
    from calibrate.profile import Profile

    profile = Profile.read(path)
    if why := profile.stale():
        click.echo(f"warning: profile {path}: {why}", err=True)
    return profile


def _setup(trace, llm, gpu, kv_cache, timing_model, profile_path, llm_library, gpu_library,
           prefix_cache_policy, prefix_cache_min_tokens, max_cached_prompts, cache_scope,
           block_size, tensor_parallel_size=1, expert_parallel_size=1,
           pipeline_parallel_size=1, kv_cache_dtype="auto"):
    """Timing, workload, prefix cache and block size from the common options."""

    params, profile = None, None
    if profile_path:
        profile = _read_profile(profile_path)
        if gpu and gpu.lower() != profile.gpu.lower():
            raise InputError(f"profile is for GPU {profile.gpu}, not {gpu}", path=profile_path,
                             field="gpu")
        llm, gpu = llm or profile.llm, profile.gpu
        timing_model = timing_model or profile.timing_model
        params = profile.params
    llm_spec, gpu_spec = _specs(llm or "Llama-3-8B", gpu or "A10", llm_library, gpu_library)
    _reject_unused([("kv_cache_dtype", kv_cache == "off", "with --kv-cache off")])
    llm_spec = with_kv_cache_dtype(llm_spec, kv_cache_dtype)
    timing = make_timing(timing_model or "roofline", llm_spec, gpu_spec, params,
                         kv_cache == "on", tensor_parallel_size, expert_parallel_size,
                         pipeline_parallel_size)
    exact = prefix_cache_policy in ("prefill", "full")
    why = f"with --prefix-cache-policy {prefix_cache_policy}"
    _reject_unused([("max_cached_prompts", not exact, why),
                    ("prefix_cache_min_tokens", not exact, why),
                    ("cache_scope", cache_scope != "global" and prefix_cache_policy == "none",
                     why)])
    workload = archive.read_trace(trace)
    prefix = None
    if prefix_cache_policy != "none":
        given = {} if prefix_cache_min_tokens is None else {"min_tokens": prefix_cache_min_tokens}
        config = PrefixCacheConfig(prefix_cache_policy, max_cached_prompts=max_cached_prompts,
                                   scope=cache_scope, block_size=block_size, **given)
        prefix = PrefixCache(config, workload.content, workload.session_ids())
        block = prefix.block_size
    else:            # without a prefix cache a trace's hash_ids still say their block size
        trace_block = workload.content.block_size if workload.content is not None else None
        block = block_size or trace_block or VLLM_BLOCK_SIZE
    return timing, workload, prefix, block, profile


def common_options(command):
    """Options ``simulate`` and ``capacity`` share: model, timing, trace, prefix cache,
    engine, arrivals, SLOs."""
    options = [
        click.option("--trace", required=True, help="Workload: CSV/Parquet/JSONL file or "
                     "bundled dataset name (e.g. azure-llm-inference-2023-conv)."),
        click.option("--llm", default=None, help="LLM from the library [default: Llama-3-8B, "
                     "or the profile's]."),
        click.option("--profile", "profile_path", default=None,
                     help="Calibrated profile whose parameters replace the defaults: a JSON "
                     "file, or the name of a shipped one ("
                     + ", ".join(shipped_profiles()) + ")."),
        click.option("--timing-model", type=click.Choice(list(TIMING_MODELS)), default=None,
                     help="[default: the profile's, else roofline]; thesis runs one request "
                     "at a time only."),
        click.option("--kv-cache", type=click.Choice(["on", "off"]), default="on",
                     show_default=True, help="off: every decode step recomputes the context "
                     "(thesis eq. 4.4)."),
        click.option("--kv-cache-dtype", type=click.Choice(list(KV_CACHE_DTYPES)),
                     default="auto", show_default=True, help="vLLM's --kv-cache-dtype: auto "
                     "keeps the model's dtype; fp8 holds one byte per element, twice the "
                     "tokens in the pool and half the KV traffic."),
        click.option("--prefix-cache-policy", type=click.Choice(POLICIES), default="none",
                     show_default=True, help="prefill/full: exact match on the first "
                     "--prefix-cache-min-tokens (thesis Listing 4.2); blocks: vLLM's automatic "
                     "prefix caching in the KV pool. See docs/simulator.md."),
        click.option("--prefix-cache-min-tokens", type=click.IntRange(min=1), default=None,
                     help="Exact-match prefix length, tokens [256]."),
        click.option("--max-cached-prompts", type=click.IntRange(min=1), default=None,
                     help="Exact-match capacity per scope unit, LRU [default: unlimited]."),
        click.option("--cache-scope", type=click.Choice(SCOPES), default="global",
                     show_default=True, help="session: a request hits only entries of its "
                     "own session_id (for blocks: vLLM's cache_salt)."),
        click.option("--block-size", type=click.IntRange(min=1), default=None,
                     help="Tokens per KV block [default: the trace's hash_ids blocks "
                     "(Mooncake 512), else vLLM's 16]."),
        click.option("--rate-scale", type=Number(min=0, min_open=True),
                     default=None, help="Divide arrival times by this (2 = twice the load)."),
        click.option("--poisson-rate", type=Number(min=0, min_open=True),
                     default=None, help="Replace arrivals by a Poisson process, req/s."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of --poisson-rate."),
        click.option("--slo-ttft", type=Number(min=0, min_open=True), default=None,
                     help="TTFT SLO, s (goodput)."),
        click.option("--slo-tpot", type=Number(min=0, min_open=True), default=None,
                     help="TPOT SLO, s (goodput)."),
        click.option("--llm-library", type=click.Path(dir_okay=False), default=None,
                     help="Extra LLM entries (TOML/JSON)."),
        click.option("--gpu-library", type=click.Path(dir_okay=False), default=None,
                     help="Extra GPU entries (TOML/JSON)."),
    ]
    for option in reversed(options):
        command = option(command)
    return engine_options(command)


def _common(o: dict, replicas_searched: bool = False):
    """Pops the shared options from ``o``; returns (timing, workload table, prefix, block,
    engine config, profile, SLOs). ``replicas_searched``: see :func:`_engine_config`."""
    config = _engine_config(o, replicas_searched)
    timing, workload, prefix, block, profile = _setup(
        o.pop("trace"), o.pop("llm"), o.pop("gpu"), o.pop("kv_cache"), o.pop("timing_model"),
        o.pop("profile_path"), o.pop("llm_library"), o.pop("gpu_library"),
        o.pop("prefix_cache_policy"), o.pop("prefix_cache_min_tokens"),
        o.pop("max_cached_prompts"), o.pop("cache_scope"), o.pop("block_size"),
        config.tensor_parallel_size, config.expert_parallel_size,
        config.pipeline_parallel_size, o.pop("kv_cache_dtype"))
    _reject_unused([("seed", o["poisson_rate"] is None, "without --poisson-rate")])
    if (config.router == "prefix-affinity" and workload.session_ids() is None
            and (prefix is None or prefix.content is None)):
        raise InputError("--router prefix-affinity has nothing to key on: the trace has no "
                         "session_id and no prefix cache over its prompts "
                         "(--prefix-cache-policy), so every request would go "
                         "least-outstanding", field="router")
    table = _arrivals(workload.table, o.pop("rate_scale"), o.pop("poisson_rate"),
                      o.pop("seed"), config.back_to_back)
    return timing, workload, table, prefix, block, config, profile, (o.pop("slo_ttft"),
                                                                      o.pop("slo_tpot"))


@main.command()
@common_options
@click.option("--gpu", default=None, help="GPU from the library [default: A10, or the "
                                          "profile's].")
@click.option("--output-folder", default="runs/simulation", show_default=True,
              type=click.Path(file_okay=False))
@click.option("--export-rate", type=Number(min=0), default=0.1, show_default=True,
              help="Fragment row interval, s; 0 writes run-length rows.")
@click.option("--fragments/--no-fragments", default=True, show_default=True,
              help="Write fragments.parquet.")
@click.option("--force", is_flag=True, help=f"Write fragment files past {ROW_LIMIT:,} rows "
              "(refused by default: a fine --export-rate over a long trace asks for billions).")
@click.option("--opendc/--no-opendc", default=True, show_default=True,
              help="Write the OpenDC workload (opendc/tasks.parquet, opendc/fragments.parquet).")
@click.option("--steps/--no-steps", "write_steps", default=False, show_default=True,
              help="Write steps.parquet (the GPU timeline: one row per interval).")
@click.option("--start-time", "--start", "start_time", default=str(DEFAULT_START),
              show_default=True, help="Wall-clock instant of simulated time 0 (ISO 8601; UTC "
              "unless a zone is given), for OpenDC and the carbon trace.")
@click.option("--power-model", type=click.Choice(POWER_MODELS), default=None,
              help="GPU power vs utilization (thesis Table 4.1) [default: the profile's "
              "calibrated model, else linear].")
@click.option("--idle-power-w", type=Number(min=0), default=None,
              help="P_idle, W [default: the profile's, else the GPU library's].")
@click.option("--max-power-w", type=Number(min=0), default=None,
              help="P_max, W [default: the profile's, else the GPU library's].")
@click.option("--power-shape", type=Number(min=0, min_open=True), default=None,
              help="r of mse, α of the asymptotic models [default 1.4 / 0.3, or the profile's].")
@click.option("--power-profile", type=click.Path(dir_okay=False), default=None,
              help="Profile with a power section (from kavier calibrate-power).")
@click.option("--carbon-trace", default=None,
              help="Carbon intensity: NL, DE, FR, BE (bundled ENTSO-E 2022) or a "
              "Parquet/CSV file with timestamp, carbon_intensity [default: no CO2].")
@click.option("--pue", type=Number(min=1), default=1.0, show_default=True,
              help="Power usage effectiveness: facility energy / IT energy.")
@click.option("--utilization-cap", type=Number(min=0, min_open=True, max=1),
              default=1.0, show_default=True,
              help="Highest utilization the power model is evaluated at.")
@click.option("--memory-bound-utilization", type=Number(0, 1), default=None,
              help="Utilization the power model sees for a step bound by memory traffic "
              "(docs/sustainability.md) [default: the power section's, fitted by kavier "
              "calibrate-power on a tracer dataset, else 0.5].")
@clean_errors
def simulate(output_folder, export_rate, fragments, opendc, write_steps, force, start_time,
             power_model, idle_power_w, max_power_w, power_shape, power_profile, carbon_trace,
             pue, utilization_cap, memory_bound_utilization, **options):
    """Simulate a workload on GPU replicas with vLLM's scheduler (one request at a time with
    --max-num-seqs 1); write requests, the GPU timeline, fragments, the OpenDC workload and a
    summary."""
    from calibrate.profile import Profile

    trace = options["trace"]
    timing, workload, table, prefix, block, config, profile, slos = _common(options)
    _reject_unused([("export_rate", not fragments, "with --no-fragments (OpenDC fragments are "
                     "always run-length)"),
                    ("start_time", not opendc and not carbon_trace, "without OpenDC export "
                     "or a carbon trace")])
    try:
        start = datetime.fromisoformat(start_time)
    except ValueError:
        raise InputError(f"not an ISO 8601 instant: {start_time!r}", field="start-time") from None
    start = start.replace(tzinfo=UTC) if start.tzinfo is None else start
    section = Profile.read_power(power_profile) if power_profile else (
        profile.power if profile else None)
    power = _power_model(power_model, idle_power_w, max_power_w, power_shape, section,
                         timing.gpu)
    carbon = None
    if carbon_trace:
        from archive.carbon import read_carbon

        carbon = CarbonTrace(read_carbon(carbon_trace), start, str(carbon_trace))
    if memory_bound_utilization is None:
        memory_bound_utilization = (section or {}).get("memory_bound_utilization",
                                                       MEMORY_BOUND_UTILIZATION)
    sus = Sustainability(power, carbon, pue, utilization_cap, memory_bound_utilization,
                         config.tensor_parallel_size)
    export = ExportOptions(export_rate, fragments, opendc, write_steps, start,
                           None if force else ROW_LIMIT)
    check_fragment_rows(table, timing, config, export)
    with run_folder(output_folder) as out:
        output = RunOutput(out, export, sus, timing.gpu,
                           config.replicas * config.pipeline_parallel_size)
        with output:
            summary = run_engine(table, timing, config, block, prefix, sus, output.requests,
                                 output.steps, *slos)
            rows = output.finish(summary["timeline_s"], replica_memory_bytes(timing, summary))
        summary = {
            "trace": str(trace), "llm": timing.llm.name, "gpu": timing.gpu.name,
            "timing_model": timing.name, "kv_cache": timing.kv_cache,
            "kv_cache_bytes_per_element": timing.llm.kv_element_bytes,
            "params": timing.params.to_dict(), "profile": options.get("profile_path"),
            "engine": asdict(config), "export_rate_s": export_rate,
            "kv_bytes_per_token": timing.llm.kv_bytes_per_token if timing.kv_cache else 0.0,
            **summary, "rows_written": rows, "start_time": str(start),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "toolkit_version": toolkit_version(),
        }
        out.json("summary.json", summary)
    layout = (f"{config.replicas} × {config.tensor_parallel_size} (tensor parallel over "
              f"{timing.tp_link.name})" if config.tensor_parallel_size > 1
              else f"{config.replicas}")
    if config.pipeline_parallel_size > 1:
        layout += (f" × {config.pipeline_parallel_size} (pipeline stages over "
                   f"{timing.stage_link.name})")
    experts = (f", experts over {config.expert_parallel_size} GPUs ({timing.ep_link.name})"
               if config.expert_parallel_size > 1 else "")
    click.echo(f"{timing.llm.name} on {layout} × {timing.gpu.name}{experts}, {timing.name} "
               f"model, {summary['engine_path']} engine (max_num_seqs {config.max_num_seqs}, "
               f"KV pool {summary['kv_pool_blocks']:,} blocks of {block}), prefix cache "
               f"{prefix.config.policy if prefix else 'none'}: {trace}")
    _print_summary(summary)
    _warn_zero_tokens(summary["zero_token_requests"])
    click.echo(f"wrote {', '.join(rows)} and summary.json in {output_folder}")


def _warn_zero_tokens(raised: dict, counted: str = "; summary.json: zero_token_requests") -> None:
    """Say on stderr how many requests asked for an empty prompt or zero output tokens,
    which the simulation served as one token (vLLM serves neither); ``counted`` says where
    the counts are written."""
    asked = {"n_input_tokens": "an empty prompt", "n_output_tokens": "0 output tokens"}
    what = [f"{n:,} request{'s' if n > 1 else ''} with {asked[field]}"
            for field, n in raised.items() if n]
    if what:
        click.echo(f"warning: {' and '.join(what)} served with one token each (vLLM rejects "
                   f"empty prompts and needs max_tokens >= 1{counted})", err=True)


def _load_measurements(dataset: str) -> tuple[pd.DataFrame, str]:
    """Measurements from a bundled dataset name, a Parquet or CSV file, or a dataset folder."""
    return archive.load(dataset), (dataset if dataset in archive.list_datasets()
                                   else str(archive.resolve(dataset)))


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
              help="Single-request measurements (bundled name, dataset folder, Parquet or CSV "
                   "file) or a serving run under load (bundled name or folder, kind serving).")
@click.option("--setup-id", default=None, help="Use only rows of this setup_id.")
@click.option("--llm", default=None, help="[default: the data's model column]")
@click.option("--gpu", default=None, help="[default: the data's gpu column]")
@click.option("--timing-model", type=click.Choice(list(TIMING_MODELS)), default="roofline",
              show_default=True)
@click.option("--attention-efficiency", type=Number(min=0, min_open=True, max=1),
              default=1.0, show_default=True,
              help="Roofline: fixed attention efficiency (see docs/calibration.md).")
@click.option("--output-folder", default="runs/calibration", show_default=True,
              type=click.Path(file_okay=False))
@click.option("--llm-library", type=click.Path(dir_okay=False), default=None,
              help="Extra LLM entries (TOML/JSON), for a model the bundled library lacks "
                   "(sweeps and serving runs).")
@click.option("--gpu-library", type=click.Path(dir_okay=False), default=None,
              help="Extra GPU entries (TOML/JSON), for a GPU the bundled library lacks.")
@click.option("--fit", default=None,
              help="Timing parameters to fit, comma-separated [serving runs: "
                   "compute_efficiency,memory_efficiency,kv_memory_efficiency,"
                   "batch_step_overhead_s,batch_seq_overhead_s; sweeps: the timing model's "
                   "defaults, docs/calibration.md].")
@click.option("--split", type=Number(), default=None,
              help="Serving runs: fit on the requests arriving in this first share of the run, "
                   "score on the rest [0.5].")
@click.option("--max-efficiency", type=Number(), default=None,
              help="Serving runs: upper bound of every fitted efficiency [0.95].")
@click.option("--max-evaluations", type=click.IntRange(min=1), default=None,
              help="Serving runs: replays the optimiser may run [400].")
@click.option("--predict", multiple=True,
              help="Serving runs: another serving run to predict with the fitted profile "
                   "(repeatable).")
@click.option("--phase-draws", type=click.IntRange(min=1), default=None,
              help="Serving runs: score (and fit) each request's latency as its mean over "
                   "this many replays with arrivals moved within a step (the phase a "
                   "step-level replay cannot know; docs/calibration.md) [1: one replay].")
@clean_errors
def calibrate(dataset, setup_id, llm, gpu, timing_model, attention_efficiency, output_folder,
              llm_library, gpu_library, fit, split, max_efficiency, max_evaluations, predict,
              phase_draws):
    """Fit the timing model to measurements (single-request sweeps, or a serving run under
    load); write a profile and a validation report."""
    from archive.datasets import kind_of

    serving = {"fit": fit, "split": split, "max_efficiency": max_efficiency,
               "max_evaluations": max_evaluations, "predict": predict or None,
               "phase_draws": phase_draws}
    if kind_of(dataset) == "serving":
        _reject_unused([(name, True, "for a serving run (its engine section names them)")
                        for name in ("setup_id", "llm", "gpu")])
        _reject_unused([("attention_efficiency", True, "for a serving run (use --fit)"),
                        ("timing_model", True, "for a serving run (roofline only)")])
        return _calibrate_serving(dataset, output_folder, llm_library, gpu_library, **serving)
    _reject_unused([(name, True, "for single-request measurements (serving runs only)")
                    for name in serving if name != "fit"]
                   + [("attention_efficiency", timing_model != "roofline",
                       "with --timing-model thesis (eqs. 4.2-4.6 have no attention term)")])
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
        attention_efficiency=attention_efficiency if timing_model == "roofline" else None,
        fit_params=_sweep_fit(fit, timing_model))
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
        cells = [f"{_pct(s[key][st]['per_size_median'])} | {_pct(s[key][st]['per_request'])}"
                 if st in s[key] else "—" for st in ("prefill", "decode")]
        click.echo(f"{label:<32}{cells[0]:>15}{cells[1]:>17}")
    t = s["thesis_defaults_thesis_scoring"]
    click.echo(f"{'thesis defaults, thesis scoring':<32}" + "".join(
        f"{t[st]:>10.2f}" if st in t else f"{'—':>10}" for st in ("prefill", "decode")))
    if batching:
        b = batching
        click.echo(f"batching overheads from {b['groups']} concurrent groups: step "
                   f"{b['batch_step_overhead_s']:.4g} s, per extra sequence "
                   f"{b['batch_seq_overhead_s']:.4g} s; MAPE {b['mape_before_pct']:.2f} -> "
                   f"{b['mape_after_pct']:.2f} %")
    click.echo("parameters: " + ", ".join(f"{k}={v:.4g}" for k, v in params.to_dict().items()
                                          if v is not None))
    click.echo(f"wrote {Path(output_folder) / 'profile.json'} and the validation report")


def _pct(value: float | None) -> str:
    """A MAPE for the table, or "—" where there is none (nothing held out)."""
    return "—" if value is None else f"{value:.2f}"


def _sweep_fit(fit: str | None, timing_model: str) -> tuple[str, ...] | None:
    """The ``--fit`` list for single-request sweeps, checked against what the model has."""
    from calibrate.estimator import FITTABLE

    if not fit:
        return None
    names = tuple(p.strip() for p in fit.split(",") if p.strip())
    unknown = [p for p in names if p not in FITTABLE[timing_model]]
    if unknown or not names:
        raise InputError(f"cannot fit {unknown or 'nothing'} with the {timing_model} model on "
                         f"single-request sweeps; choose from "
                         f"{', '.join(FITTABLE[timing_model])}", field="fit")
    return names


def _calibrate_serving(dataset, output_folder, llm_lib, gpu_lib, fit, split, max_efficiency,
                       max_evaluations, predict, phase_draws):
    """``kavier calibrate --dataset <serving run>``: fit, report, profile; ``llm_lib`` and
    ``gpu_lib`` add library entries for the models and GPUs the runs' engine sections name."""
    from archive.datasets import content_sha256
    from calibrate.profile import Profile
    from calibrate.serving import METRICS, SERVING_FIT_PARAMS, calibrate_serving
    from calibrate.serving_report import (
        predictions_table,
        simulated_timeseries,
        timeseries_errors,
        write_serving_report,
    )

    names = (tuple(p.strip() for p in fit.split(",") if p.strip()) if fit
             else SERVING_FIT_PARAMS)
    split = 0.5 if split is None else split
    draws = phase_draws or 1
    result = calibrate_serving(dataset, names, split,
                               0.95 if max_efficiency is None else max_efficiency,
                               max_evaluations or 400, tuple(predict or ()),
                               phase_draws=draws, llm_lib=llm_lib, gpu_lib=gpu_lib)
    run, f = result.run, result.fit
    engine = run.engine
    table = predictions_table(result.measured, result.predicted, run.requests, result.mask)
    ticks = (run.timeseries["t_s"].to_numpy() if run.timeseries is not None
             else np.arange(1.0, float(result.predicted["end_s"].max()) + 1.0))
    simulated = simulated_timeseries(result.predicted, result.steps,
                                     result.summary["kv_pool_blocks"], ticks)
    llm = llm_library(llm_lib).get(engine["llm"]).name
    gpu = gpu_library(gpu_lib).get(engine["gpu"]).name
    profile = Profile(
        gpu=gpu, llm=llm, engine=f"{engine['name']} {engine['version']}",
        timing_model="roofline", params=f.params,
        mape_pct={"fit": f.after["fit"], "heldout": f.after["heldout"],
                  "defaults_heldout": f.before["heldout"]},
        datasets=[dataset], data_sha256=content_sha256(run.requests[[
            "request_id", "arrival_s", "n_input_tokens", "n_output_tokens", *METRICS]]),
        cv=f"fit on the requests arriving in the first {split:.0%} of the run, scored on the "
           "rest" + (f"; latencies averaged over {draws} arrival-phase draws" if draws > 1
                     else ""), created=datetime.now(UTC).isoformat(timespec="seconds"),
        toolkit_version=toolkit_version())
    scores = {"before": f.before, "after": f.after, "fitted": list(f.fitted),
              "on_bound": f.on_bound, "evaluations": f.evaluations,
              "preemptions": {"predicted": result.summary["preemptions"],
                              "measured": "not recorded by the run"},
              "timeseries": timeseries_errors(run.timeseries, simulated),
              "itl": result.itl, "predicted_runs": result.predicted_runs,
              "phase_floor_heldout": result.floor, "phase_draws": draws,
              "expected_over_phases": result.expected}
    with run_folder(output_folder) as out:
        write_serving_report(out, f, profile, table, run.timeseries, simulated, scores,
                             result.predicted_runs)
        out.json("summary.json", {"profile": "profile.json", "scores": "scores.json"})
    per = f" of {draws} arrival-phase draws each" if draws > 1 else ""
    click.echo(f"calibrated roofline model for {llm} on {gpu} on the serving run {dataset} "
               f"({len(run.requests)} requests, {f.evaluations} replays{per})")
    rows = [("defaults, held out", f.before["heldout"]), ("calibrated, fit", f.after["fit"]),
            ("calibrated, held out", f.after["heldout"]),
            ("calibrated, all requests", f.after["all"])]
    if result.floor is not None:
        rows.append(("step-phase floor, held out", result.floor))
    if result.expected is not None:
        rows += [(f"held out, mean of {result.expected['draws']} phase draws",
                  result.expected["heldout"]),
                 ("  its step-phase floor", result.expected["floor"])]
    rows += [(f"predicting {n}, all requests", s) for n, s in result.predicted_runs.items()]
    width = max(len(label) for label, _ in rows) + 1      # run names are long: never cut them
    click.echo(f"{'per-request MAPE [%]':<{width}}{'TTFT':>8}{'TPOT':>8}{'E2E':>8}")
    for label, s in rows:
        click.echo(f"{label:<{width}}" + "".join(
            f"{s[m]['mape_pct']:>8.2f}" if s[m]["n"] else f"{'—':>8}"
            for m in ("ttft_s", "tpot_s", "e2e_s")))
    click.echo("signed error, calibrated, all requests: " + "; ".join(
        f"{m[:-2].upper()} mean {f.after['all'][m]['mean_error_pct']:+.1f} %, p99 "
        f"{f.after['all'][m]['p99_error_pct']:+.1f} %" for m in ("ttft_s", "tpot_s", "e2e_s")))
    itl = result.itl["error_pct"]
    click.echo("ITL, calibrated, signed error: " + ", ".join(
        f"{k} {v:+.1f} %" for k, v in itl.items() if v is not None)
        + ("" if itl["p50"] is not None else " (the run records no per-token gaps)"))
    click.echo(f"preemptions: simulated {result.summary['preemptions']:,} (the run does not "
               "record its own)")
    for column, e in scores["timeseries"].items():
        click.echo(f"{column}: simulated vs measured, mean absolute error {e['mae']:.2f} "
                   f"(measured mean {e['measured_mean']:.2f})")
    click.echo("parameters: " + ", ".join(f"{k}={getattr(f.params, k):.4g}" for k in f.fitted))
    if f.on_bound:
        click.echo(f"warning: on a bound, not identified by this run: {', '.join(f.on_bound)}",
                   err=True)
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
@click.option("--price-per-gpu-hour", default="1.2", show_default=True,
              help="Price of one GPU-hour (thesis: 1.2 €/h for an A10): one value, or one per "
                   "run, comma-separated (runs on different GPUs).")
@click.option("--currency", default="EUR", show_default=True)
@click.option("--opendc-power", "opendc_power", multiple=True, type=click.Path(dir_okay=False),
              help="OpenDC powerSource.parquet whose energy and CO2 replace the run's; once "
                   "per run, in order.")
@clean_errors
def efficiency(run_dirs, price_per_gpu_hour, currency, opendc_power):
    """Efficiency report of one simulated run, or of two and their ratios (eqs. 4.8–4.11)."""
    from kavier.analysis.efficiency import ratios, read_run, report, with_opendc_power

    if len(run_dirs) > 2:
        raise InputError("give one run folder, or two to compare")
    if len(opendc_power) > len(run_dirs):
        raise InputError("more --opendc-power files than runs", field="opendc-power")
    prices = _number_list(price_per_gpu_hour, float, "price-per-gpu-hour")
    if len(prices) not in (1, len(run_dirs)):
        raise InputError(f"{len(prices)} prices for {len(run_dirs)} runs",
                         field="price-per-gpu-hour")
    prices = prices * len(run_dirs) if len(prices) == 1 else prices
    totals = [read_run(d) for d in run_dirs]
    totals = [with_opendc_power(t, p) if p else t for t, p in
              zip(totals, list(opendc_power) + [None] * len(totals), strict=False)]
    reports = [report(t, price) for t, price in zip(totals, prices, strict=True)]
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
@click.argument("capture", type=click.Path(exists=True))
@click.option("--fields", default=None,
              help="nvidia-smi --query-gpu fields of a CSV capture, in order [default: "
                   + ",".join(CAPTURE_FIELDS) + "].")
@click.option("--gpu", default=None, help="GPU the capture is from (recorded in the profile) "
                                          "[default: a dataset's].")
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False), default=None,
              help="Timing profile to add the power section to (and, with a dataset, to time "
                   "its requests with) [default: write a power-only profile in the output "
                   "folder].")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="Contiguous cross-validation blocks.")
@click.option("--output-folder", default="runs/power", show_default=True,
              type=click.Path(file_okay=False))
@clean_errors
def calibrate_power(capture, fields, gpu, profile_path, folds, output_folder):
    """Fit the power models of thesis Table 4.1 to nvidia-smi samples (a CSV capture, or a
    tracer dataset's gpu_samples.parquet) and rank them by MAPE; with a tracer collect dataset,
    also fit memory_bound_utilization to its requests' measured power, and with a tracer bench
    serving run to its samples set against the replayed run's steps."""
    from archive.smi import read_capture
    from calibrate.power import calibrate_power as fit
    from calibrate.power_report import power_section, write_power_report

    profile = _read_profile(profile_path) if profile_path else None
    recorded = None
    if Path(capture).is_dir():
        if fields is not None:
            raise InputError("--fields describes a CSV capture; a dataset's samples are "
                             "named", field="fields")
        samples, measurements, recorded = _dataset_samples(Path(capture))
    else:
        fields = fields or ",".join(CAPTURE_FIELDS)
        samples = read_capture(capture, tuple(f.strip() for f in fields.split(",")))
        measurements = None
    gpu = _agreeing_gpu([("--gpu", gpu), (str(capture), recorded),
                         (str(profile_path), profile.gpu if profile else None)])
    result = fit(samples, folds)
    section = power_section(result, capture, samples, gpu)
    serving = Path(capture).is_dir() and measurements is None
    if serving:
        from archive.serving import read_serving
        from calibrate.power_phases import serving_phases

        params = profile.params if profile else None
        section["phases"] = serving_phases(capture, read_serving(capture), samples,
                                           result.best, params)
    elif measurements is not None and "request_id" in samples.columns:
        section["phases"] = _fit_phases(measurements, samples, result.best, profile, gpu)
    if "phases" in section:
        section["memory_bound_utilization"] = section["phases"]["memory_bound_utilization"]
        # the simulator evaluates P at the utilization of each step's costs: the fit that
        # matches its view sets P_max (docs/sustainability.md)
        section["model"] = {**section["model"], "max_w": section["phases"]["max_w"]}
    with run_folder(output_folder) as out:
        write_power_report(out, result, samples, section)
        if profile is not None:
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
    phases = section.get("phases")
    if phases and serving:
        click.echo(f"memory_bound_utilization {phases['memory_bound_utilization']:.3f}, P_max "
                   f"{phases['max_w']:.1f} W: power MAPE {phases['mape_pct']:.2f} % over "
                   f"{phases['samples']} samples aligned with the replayed run "
                   f"({phases['window_s']:.3g} s windows; {phases['mape_default_pct']:.2f} % at "
                   "the default 0.5)")
    elif phases:
        click.echo(f"memory_bound_utilization {phases['memory_bound_utilization']:.3f}, P_max "
                   f"{phases['max_w']:.1f} W: per-request power MAPE {phases['mape_pct']:.2f} % "
                   f"over "
                   f"{phases['requests']} requests ({phases['mape_default_pct']:.2f} % at the "
                   f"default 0.5); " + ", ".join(
                       f"{k} measured {v['measured_w']:.0f} W, predicted {v['predicted_w']:.0f} W"
                       for k, v in phases["by_sweep"].items()))
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"best: {result.best.name}; wrote {Path(output_folder)}/power_profile.json, "
               f"power_fit.png, ranking.csv" + (f" and the power section of {profile_path}"
                                                if profile_path else ""))


def _agreeing_gpu(sources: list[tuple[str, str | None]]) -> str | None:
    """The one GPU that ``(source, name)`` pairs name (None where none does), compared by
    their library names (``NVIDIA A10`` is ``A10``).

    Raises
    ------
    InputError
        When two sources name different GPUs: a power section from one GPU's capture would
        otherwise be recorded as another's.
    """
    named = [(where, name) for where, name in sources if name]
    library = gpu_library()

    def key(name: str) -> str:
        try:
            return library.get(name).name
        except InputError:                    # not in the library: compare as written
            return name.strip().lower()

    for where, name in named[1:]:
        if key(name) != key(named[0][1]):
            raise InputError(f"{where} is for GPU {name}, {named[0][0]} for {named[0][1]}",
                             field="gpu")
    return named[0][1] if named else None


def _dataset_samples(folder: Path):
    """A tracer dataset's GPU samples without gaps (``[N/A]`` values; counted on stderr), its
    measurements (None for a serving run) and GPU name (``setup.json``'s, or a serving run's
    engine section's)."""
    import pandas as pd

    from archive.errors import read_json_object

    path = folder / "gpu_samples.parquet"
    if not path.is_file():
        raise InputError("no gpu_samples.parquet: sample the run with --ssh or --local-smi",
                         path=folder)
    from archive.datasets import verified

    verified(folder, {**read_json_object(folder / "dataset.json", "dataset card"),
                      "main_table": path.name})
    samples = pd.read_parquet(path)
    gaps = samples["power_w"].isna() | samples["utilization_gpu_pct"].isna()
    if gaps.any():
        click.echo(f"skipping {int(gaps.sum())} of {len(samples)} samples with values "
                   "nvidia-smi could not read", err=True)
    samples = samples[~gaps].reset_index(drop=True)
    setup = folder / "setup.json"
    meta = read_json_object(setup, "setup") if setup.is_file() else read_json_object(
        folder / "dataset.json", "dataset card").get("engine", {})   # a serving run's
    measured = folder / "measurements.parquet"
    measurements = pd.read_parquet(measured) if measured.is_file() else None
    return samples, measurements, meta.get("gpu")


def _fit_phases(measurements, samples, model, profile, gpu: str | None):
    """:func:`calibrate.power_phases.fit_memory_bound_utilization` with the profile's timing
    (its LLM must be the dataset's), else the library defaults for the dataset's GPU and
    LLM."""
    from calibrate.power_phases import fit_memory_bound_utilization, request_power

    llm = str(measurements["model"].iloc[0])
    if profile is not None:
        library = llm_library()
        if library.get(llm).name != library.get(profile.llm).name:
            raise InputError(f"the dataset's requests are of {llm}, the profile's timing is "
                             f"for {profile.llm}", field="profile")
        timing = make_timing(profile.timing_model, *_specs(profile.llm, profile.gpu,
                                                            None, None), profile.params)
    else:
        if gpu is None:
            raise InputError("the dataset names no GPU; pass --gpu", field="gpu")
        timing = make_timing("roofline", *_specs(llm, gpu, None, None))
    return fit_memory_bound_utilization(request_power(measurements, samples), timing, model)


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
    import pandas as pd

    from kavier.analysis.reproduce import EXPERIMENTS, RUNNERS

    tables = []
    for name in EXPERIMENTS if experiment == "all" else (experiment,):
        folder = Path(output_folder) / name
        start = datetime.now(UTC)
        with run_folder(folder) as out:
            result = RUNNERS[name](out, quick=quick, scheduler=scheduler, workers=workers)
            tables.append(result["comparison"])
            out.text("comparison.csv", result["comparison"].to_csv(index=False))
            out.json("summary.json", {"experiment": name, "quick": quick,
                                      "started": start.isoformat(timespec="seconds"),
                                      "toolkit_version": toolkit_version()})
        click.echo(f"{name}: wrote {folder}/report.md and its data and figures")
    table = pd.concat(tables, ignore_index=True)
    width = int(table["quantity"].str.len().max())
    click.echo(f"\n{'experiment':<14}{'quantity':<{width + 2}}{'thesis':>10}{'ours':>11}"
               + ("   (quick inputs: not comparable)" if quick else ""))
    for row in table.itertuples(index=False):
        thesis = "—" if row.thesis is None else f"{row.thesis:.4g}"
        click.echo(f"{row.experiment:<14}{row.quantity:<{width + 2}}{thesis:>10}"
                   f"{row.ours:>11.4g}")


def _number_list(text: str, kind, name: str) -> list:
    """The comma-separated positive, finite numbers of option ``name`` (``kind``: int or
    float); NaN and infinity are refused (``nan <= 0`` is false, so a sign check alone let
    ``--price-per-gpu-hour nan`` print NaN costs)."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"expected a comma-separated list of numbers, got {text!r}",
                         field=name) from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"expected positive finite numbers, got {text!r}", field=name)
    return values


@main.command()
@common_options
@click.option("--gpu", "gpus", default="A100-80GB", show_default=True,
              help="GPU types to compare, comma-separated (library names).")
@click.option("--tensor-parallel-sizes", default="1,2,4,8", show_default=True,
              help="Tensor-parallel sizes to try per GPU type, comma-separated.")
@click.option("--percentile", type=Number(0, 100), default=99.0, show_default=True,
              help="The SLOs hold at this percentile of TTFT and TPOT.")
@click.option("--max-replicas", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--price-per-gpu-hour", default="1.2", show_default=True,
              help="Price of one GPU-hour: one value, or one per --gpu, comma-separated.")
@click.option("--currency", default="EUR", show_default=True)
@click.option("--scheduler", default=None,
              help="Dask scheduler address (tcp://host:8786) for the candidates [default: "
                   "local worker processes].")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Local worker processes [default: one per CPU].")
@clean_errors
def capacity(gpus, tensor_parallel_sizes, percentile, max_replicas, price_per_gpu_hour,
             currency, scheduler, workers, **options):
    """Cheapest deployment (GPU type × tensor-parallel size × replicas) whose TTFT and TPOT
    meet the SLOs at a percentile; every candidate's replicas, GPUs, SLO attainment and cost
    per million tokens, cheapest first. With --enable-expert-parallel a candidate's experts are
    split over all its GPUs; a one-GPU candidate holds them all."""
    from kavier.analysis.capacity import plan_candidate, ranked
    from kavier.analysis.sweep import run_points

    if options["slo_ttft"] is None and options["slo_tpot"] is None:
        raise InputError("give --slo-ttft and/or --slo-tpot", field="slo-ttft")
    for name in ("replicas", "tensor_parallel_size"):
        if _given(name):
            raise InputError(f"capacity searches it; do not pass {flag(name)}",
                             field=flag(name)[2:])
    names = [g.strip() for g in gpus.split(",") if g.strip()]
    sizes = _number_list(tensor_parallel_sizes, int, "tensor-parallel-sizes")
    prices = _number_list(price_per_gpu_hour, float, "price-per-gpu-hour")
    if len(prices) not in (1, len(names)):
        raise InputError(f"{len(prices)} prices for {len(names)} GPU types",
                         field="price-per-gpu-hour")
    prices = prices * len(names) if len(prices) == 1 else prices
    specs = [gpu_library(options["gpu_library"]).get(n) for n in names]
    options["gpu"] = names[0]
    timing, workload, table, prefix, block, config, profile, slos = _common(
        options, replicas_searched=True)
    _warn_zero_tokens(served_sizes(table)[2], counted="")
    if profile is not None and any(g.name != profile.gpu for g in specs):
        raise InputError(f"the profile is for {profile.gpu}; compare other GPUs without it",
                         field="profile")
    # each GPU type its own library defaults (the compute efficiency follows its measured
    # GEMM share); only a profile, which is for one GPU, fixes them for every candidate
    points = [{"llm": timing.llm, "gpu": gpu, "tensor_parallel_size": tp,
               "params": None if profile is None else profile.params, "kv_cache": timing.kv_cache,
               "timing_model": timing.name, "config": config, "table": table, "block": block,
               "prefix": prefix, "sessions": workload.session_ids(), "slo_ttft_s": slos[0],
               "slo_tpot_s": slos[1], "percentile": percentile, "max_replicas": max_replicas,
               "price_per_gpu_hour": price}
              for gpu, price in zip(specs, prices, strict=True) for tp in sizes]
    results = ranked(run_points(plan_candidate, points, scheduler, workers))
    p = f"p{percentile:g}"
    if config.pipeline_parallel_size > 1:
        click.echo(f"each replica: TP × {config.pipeline_parallel_size} pipeline stages")
    click.echo(f"{'GPU':<14}{'TP':>3}{'replicas':>9}{'GPUs':>6}{p + ' TTFT s':>14}"
               f"{p + ' TPOT s':>14}{'SLO attain.':>12}{currency + '/Mtok':>11}  tried")
    for r in results:
        tried = " ".join(f"{n}{'+' if ok else '-'}" for n, ok in r["tried"].items())
        if r["status"] != "ok":
            click.echo(f"{r['gpu']:<14}{r['tensor_parallel_size']:>3}  {r['status']}"
                       + (f"  ({tried})" if tried else ""))
            continue
        cells = [f"{r[f'p_{m}']:>14.4g}" if f"p_{m}" in r else f"{'—':>14}"   # no SLO on it
                 for m in ("ttft_s", "tpot_s")]
        click.echo(f"{r['gpu']:<14}{r['tensor_parallel_size']:>3}{r['replicas']:>9}"
                   f"{r['gpus']:>6}{''.join(cells)}{r['slo_attainment']:>12.3f}"
                   f"{r['cost_per_mtok']:>11.4f}  {tried}")
    best = next((r for r in results if r["status"] == "ok"), None)
    if best is None:
        raise InputError("no candidate meets the SLOs (raise --max-replicas or try other GPUs)")
    stages = (f" × {config.pipeline_parallel_size} stages"
              if config.pipeline_parallel_size > 1 else "")
    gpus = f"{best['gpus']} GPU{'s' if best['gpus'] > 1 else ''}"
    click.echo(f"cheapest: {best['replicas']} × {best['tensor_parallel_size']}{stages} × "
               f"{best['gpu']} ({gpus}), {best['cost_per_run']:.4g} {currency} "
               f"per run, {best['cost_per_mtok']:.4f} {currency} per million tokens")
