"""``tracer`` command line."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import click
from tqdm import tqdm

from archive.errors import InputError, Number, clean_errors
from archive.serving import engine_problems
from archive.smi import CAPTURE_FIELDS, read_capture, samples_table
from tracer.collect import POWERS_OF_TWO


@click.group()
def main():
    """Tracer: measure LLM serving and write LLM Trace Archive datasets."""


@main.command("parse-smi")
@click.argument("capture", type=click.Path(dir_okay=False))
@click.option("--fields", default=",".join(CAPTURE_FIELDS), show_default=True,
              help="The --query-gpu fields, in the order nvidia-smi printed them.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True,
              help="Parquet file of GPU samples to write.")
@click.option("--run-id", default=None, help="Run the samples belong to [default: the "
                                              "capture's file name].")
@clean_errors
def parse_smi(capture, fields, output, run_id):
    """Convert captured nvidia-smi CSV output into an archive GPU-samples Parquet table."""
    from pathlib import Path

    import pyarrow.parquet as pq

    if run_id is not None and not run_id.strip():        # "" had fallen back to the file name
        raise InputError("must not be empty", field="run-id")
    fields = tuple(f.strip() for f in fields.split(","))
    samples = read_capture(capture, fields)
    pq.write_table(samples_table(samples, run_id or Path(capture).stem, fields), output)
    span = (samples["timestamp"].iloc[-1] - samples["timestamp"].iloc[0]).total_seconds()
    click.echo(f"{len(samples)} samples over {span:.1f} s; power "
               f"{samples['power_w'].min():.1f}–{samples['power_w'].max():.1f} W -> {output}")


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated token counts, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter("token counts must be >= 1")
    return sizes


def _api_key(env: str, path: str | None) -> str | None:
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise InputError(f"cannot read the API key file: {exc.strerror}",
                             field="api-key-file") from None
    return os.environ.get(env) or None


def api_key_options(command):
    """Where the API key comes from (never the command line), shared by ``collect`` and
    ``bench``."""
    command = click.option("--api-key-file", type=click.Path(dir_okay=False), default=None,
                           help="File holding the API key (never pass keys on the command "
                                "line).")(command)
    return click.option("--api-key-env", default="TRACER_API_KEY", show_default=True,
                        help="Environment variable holding the API key.")(command)


def _decorated(command, options: list):
    """``command`` with click ``options`` applied, the first listed shown first in --help."""
    for option in reversed(options):
        command = option(command)
    return command


def sampling_options(command):
    """GPU sampling options shared by ``collect`` and ``bench``."""
    options = [
        click.option("--ssh", "ssh_target", default=None,
                     help="GPU node to sample nvidia-smi on: user@host[:port] or a "
                          "~/.ssh/config alias."),
        click.option("--ssh-jump", default=None,
                     help="Host the GPU node is reached through (ProxyJump): user@host[:port] "
                          "or an alias [default: the config's ProxyJump]."),
        click.option("--ssh-config", type=click.Path(dir_okay=False), default=None,
                     help="SSH config file for aliases [default: ~/.ssh/config]."),
        click.option("--ssh-key", type=click.Path(dir_okay=False), default=None,
                     help="Private key file [default: the config's IdentityFile, else the SSH "
                          "agent]."),
        click.option("--known-hosts", type=click.Path(dir_okay=False), default=None,
                     help="known_hosts file [default: ~/.ssh/known_hosts]."),
        click.option("--accept-unknown-host", is_flag=True,
                     help="Trust a host key not in known_hosts (first contact only; prefer "
                          "adding it)."),
        click.option("--local-smi", is_flag=True,
                     help="Sample nvidia-smi on this machine (the tracer runs inside the job "
                          "on the GPU node)."),
        click.option("--dcgm", "dcgm_url", default=None,
                     help="Scrape this NVIDIA DCGM exporter (http://node:9400/metrics) instead "
                          "of running nvidia-smi."),
        click.option("--gpu-index", default=None,
                     help="GPUs to sample, comma-separated nvidia-smi indices [default: "
                          "locally CUDA_VISIBLE_DEVICES or SLURM_JOB_GPUS, else all]."),
        click.option("--loop-ms", type=click.IntRange(min=10), default=100, show_default=True,
                     help="nvidia-smi sampling interval, ms."),
    ]
    return _decorated(command, options)


def _sampler(o: dict):
    """The :class:`~tracer.sampler.NvidiaSmiSampler` the sampling options ask for, or None;
    pops them from ``o``."""
    from tracer.sampler import NvidiaSmiSampler
    from tracer.ssh import SSHTarget

    ssh, local, dcgm = o.pop("ssh_target"), o.pop("local_smi"), o.pop("dcgm_url")
    jump, config, key = o.pop("ssh_jump"), o.pop("ssh_config"), o.pop("ssh_key")
    known, accept, loop_ms = o.pop("known_hosts"), o.pop("accept_unknown_host"), o.pop("loop_ms")
    indices = o.pop("gpu_index")
    if sum(map(bool, (ssh, local, dcgm))) > 1:
        raise InputError("--ssh, --local-smi and --dcgm exclude each other",
                         field="dcgm" if dcgm else "local-smi")
    if not ssh:
        for name, value in (("ssh-jump", jump), ("ssh-config", config), ("ssh-key", key),
                            ("known-hosts", known), ("accept-unknown-host", accept)):
            if value:
                raise InputError(f"--{name} has no effect without --ssh", field=name)
    if not (ssh or local or dcgm):
        given_loop = click.get_current_context().get_parameter_source("loop_ms") not in (
            None, click.core.ParameterSource.DEFAULT)
        for name, value in (("gpu-index", indices), ("loop-ms", given_loop)):
            if value:
                raise InputError(f"--{name} has no effect without --ssh, --local-smi or "
                                 "--dcgm", field=name)
        return None
    target = SSHTarget.parse(ssh, key, known, accept, jump, config,
                             os.environ.get("USER", "")) if ssh else None
    return NvidiaSmiSampler(target, loop_ms, _gpu_indices(indices), dcgm_url=dcgm)


@main.command()
@click.option("--url", required=True, help="vLLM server, e.g. http://node:8000.")
@click.option("--output", "output", required=True, type=click.Path(file_okay=False),
              help="Dataset folder to write.")
@click.option("--gpu", required=True, help="GPU name as in the Kavier GPU library (e.g. A10).")
@click.option("--provider", default="local", show_default=True, help="Cluster or cloud.")
@click.option("--model-name", default=None,
              help="Model name as in the Kavier LLM library [default: the served model id].")
@click.option("--prefill-sizes", default=",".join(map(str, POWERS_OF_TWO)), show_default=True,
              callback=lambda c, p, v: _sizes(v))
@click.option("--decode-sizes", default=",".join(map(str, POWERS_OF_TWO)), show_default=True,
              callback=lambda c, p, v: _sizes(v))
@click.option("--repetitions", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--concurrency", default="1", show_default=True, callback=lambda c, p, v:
              _sizes(v), help="Comma-separated concurrency levels: at level c each repetition "
              "sends c requests together.")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--salt", type=click.Choice(["cache_salt", "prompt", "none"]),
              default="cache_salt", show_default=True,
              help="How to defeat the server's prefix cache per request.")
@api_key_options
@sampling_options
@click.option("--resume", is_flag=True, help="Continue an interrupted sweep in OUTPUT.")
@click.option("--timeout", "timeout_s", type=Number(min=0, min_open=True),
              default=600.0, show_default=True, help="Per-request timeout, s.")
@click.option("--dtype", default="", help="The server's --dtype, for the record (setup.json).")
@clean_errors
def collect(url, output, gpu, provider, model_name, prefill_sizes, decode_sizes, repetitions,
            concurrency, warmup, salt, api_key_env, api_key_file, resume, timeout_s, dtype,
            **sampling):
    """Measure prefill and decode sweeps on a vLLM server; write an archive dataset."""
    from tracer.client import ServerError, VLLMClient
    from tracer.collect import Setup, SweepPlan
    from tracer.collect import collect as run_collect
    from tracer.ssh import SSHError

    sampler = _sampler(sampling)
    client = VLLMClient(url, _api_key(api_key_env, api_key_file), timeout_s)
    try:
        served = client.models()[0]["id"]
        version = client.version()
        node = (sampler.target.host if sampler and sampler.target else
                urlsplit(sampler.dcgm_url).hostname if sampler and sampler.dcgm_url else
                os.uname().nodename if sampler else "")
        setup = Setup(provider, gpu, model_name or served, served, engine_version=version,
                      node=node, dtype=dtype)
        plan = SweepPlan(prefill_sizes, decode_sizes, repetitions, warmup, salt=salt,
                         concurrency=concurrency)
        n_in, n_out = plan.tokens()
        click.echo(f"plan: {len(plan.requests()):,} requests, {n_in:,} prompt + {n_out:,} "
                   f"output tokens (at 20 ms per output token about {n_out * 0.02 / 3600:.2g} h"
                   " of decode)", err=True)
        with tqdm(total=len(plan.requests()), unit="req", disable=None, desc="collect") as bar:
            out = run_collect(client, plan, setup, output, sampler, resume,
                              lambda done, total: bar.update(1))
    except (ServerError, SSHError) as exc:
        raise InputError(str(exc)) from None
    for gap in sampler.gaps if sampler else ():
        click.echo(f"GPU samples: {gap}", err=True)
    click.echo(f"wrote {out} (measurements.parquet, setup.json"
               f"{', gpu_samples.parquet' if sampler else ''}, dataset.json)")


def bench_options(command):
    """The schedule, load and recording options of ``bench`` and ``run``."""
    options = [
        click.option("--output", required=True, type=click.Path(file_okay=False),
                     help="Serving-run dataset folder to write (requests.jsonl as requests "
                          "complete)."),
        click.option("--trace", default=None,
                     help="Replay this archive workload's arrivals and sizes (bundled name or "
                          "file) instead of a Poisson schedule."),
        click.option("--rate-scale", type=Number(min=0, min_open=True), default=None,
                     help="--trace: divide its arrival times by this [1]."),
        click.option("--request-rate", type=Number(min=0, min_open=True, allow_inf=True),
                     default=None,
                     help="Poisson schedule: requests per second (inf: all at once) [1]."),
        click.option("--burstiness", type=Number(min=0, min_open=True, allow_inf=True),
                     default=None,
                     help="Poisson schedule: shape of the gamma-distributed gaps (1 = Poisson, "
                          "inf = a constant rate) [1]."),
        click.option("--input-len", type=click.IntRange(min=1), default=None,
                     help="Poisson schedule: prompt tokens per request [512]."),
        click.option("--output-len", type=click.IntRange(min=1), default=None,
                     help="Poisson schedule: output tokens per request [128]."),
        click.option("--seed", type=int, default=None, help="Poisson schedule: seed [0]."),
        click.option("--stages", default=None,
                     help="Load stages instead of one rate: rate:length pairs, requests/s and "
                          "seconds or a request count, e.g. 2:30,5:30s,10:500req (each a "
                          "Poisson process; --num-prompts not used)."),
        click.option("--workload", type=click.Choice(["fixed", "shared-prefix",
                                                      "sessions", "prompts"]),
                     default=None,
                     help="fixed: every prompt --input-len tokens; shared-prefix: --prefix-groups"
                          " system prompts of --prefix-len tokens, each request one of them plus "
                          "its own --input-len-token question; sessions: --num-prompts "
                          "conversations of --turns turns, each turn the conversation so far plus"
                          " an --input-len-token question, sent --think-time after the previous "
                          "answer; prompts: the real prompts of --prompt-file [fixed]."),
        click.option("--prompt-file", type=click.Path(dir_okay=False), default=None,
                     help="prompts: a ShareGPT JSON file (first turn the prompt, second the "
                          "completion whose token count is the output length, filtered as vllm "
                          "bench serve does) or JSON Lines of input_tok_ids and output_toks; "
                          "shuffled by --seed (docs/tracer.md)."),
        click.option("--turns", type=click.IntRange(min=1), default=None,
                     help="sessions: turns per conversation [3]."),
        click.option("--think-time", type=Number(min=0), default=None,
                     help="sessions: seconds between an answer and the next turn [0]."),
        click.option("--prefix-groups", type=click.IntRange(min=1), default=None,
                     help="shared-prefix: system prompts [8]."),
        click.option("--prefix-len", type=click.IntRange(min=1), default=None,
                     help="shared-prefix: tokens per system prompt [1024]."),
        click.option("--cache-salt", type=click.Choice(["auto", "request", "none"]),
                     default="auto", show_default=True,
                     help="request: a vLLM cache_salt per request, so equal prompts never hit "
                          "each other's cached blocks; none: the server's prefix cache works "
                          "across requests (block hashes are recorded for the replay); auto: none"
                          " for shared-prefix, request otherwise."),
        click.option("--num-prompts", type=click.IntRange(min=1), default=100,
                     show_default=True, help="Requests to send (the first ones of a --trace)."),
        click.option("--max-concurrency", type=click.IntRange(min=1), default=None,
                     help="Most requests in flight at once [no limit]."),
        click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True,
                     help="Requests sent before the schedule and not recorded."),
        click.option("--timeout", "timeout_s", type=Number(min=0, min_open=True),
                     default=600.0, show_default=True, help="Per-request timeout, s."),
        click.option("--allow-failures", is_flag=True,
                     help="Exit 0 even when requests failed (they are recorded either way)."),
        click.option("--resume", is_flag=True,
                     help="Continue an interrupted run in OUTPUT (same options): logged requests "
                          "are not sent again."),
    ]
    return _decorated(command, options)


@main.command()
@click.option("--url", required=True, help="OpenAI-compatible server, e.g. http://node:8000.")
@click.option("--engine", "engine_file", required=True, type=click.Path(dir_okay=False),
              help="JSON of the engine settings the server does not report (gpu, "
                   "max_num_seqs, max_num_batched_tokens, ...; docs/tracer.md), or the file "
                   "tracer serve --engine-out wrote.")
@click.option("--model", default=None, help="Served model id [default: the first served].")
@bench_options
@api_key_options
@sampling_options
@clean_errors
def bench(url, engine_file, model, api_key_env, api_key_file, **o):
    """Serve a schedule of requests under load (like vllm bench serve); write a serving-run
    dataset for kavier calibrate --dataset."""
    from archive.errors import read_json_object

    sampler = _sampler(o)
    given = read_json_object(engine_file, "engine settings file")
    for field, message in engine_problems(given, complete=False)[:1]:
        raise InputError(message, path=engine_file, field=field)   # before the run records it
    plan = _bench_plan(o, given, gpu_known=sampler is not None)
    _bench(url, plan, given, model, _api_key(api_key_env, api_key_file), sampler, o)


REQUIRED_ENGINE = ("gpu", "max_num_seqs", "max_num_batched_tokens")
"""Engine settings a serving run must record that no server endpoint reports."""


SCHEDULE_KEYS = ("request_rate", "burstiness", "input_len", "output_len", "seed", "stages",
                 "workload", "prefix_groups", "prefix_len", "turns", "think_time", "rate_scale",
                 "num_prompts", "prompt_file")


def _bench_plan(o: dict, given: dict, gpu_known: bool) -> dict:
    """Check the bench options ``o`` and the engine settings ``given`` before anything is
    sent or started; returns the schedule options, with a ``--prompt-file``'s prompts read.

    Raises
    ------
    InputError
        For options without effect, engine settings a run must record that are missing
        (``gpu`` is known otherwise when ``gpu_known``), or a bad prompt file.
    """
    options = {k: o[k] for k in SCHEDULE_KEYS}
    _check_workload_options(o["trace"], options)
    missing = [k for k in REQUIRED_ENGINE if k not in given and not (k == "gpu" and gpu_known)]
    if missing:
        raise InputError(f"the engine settings lack {', '.join(missing)} (the server does not "
                         "report them; give them in --engine, or in the vLLM command for "
                         "tracer run)", field="engine")
    if options["prompt_file"] is not None:
        from tracer.prompts import read_prompt_file

        options["records"] = read_prompt_file(options["prompt_file"])
    return options


def _bench(url: str, plan: dict, given: dict, model: str | None, key: str | None, sampler,
           o: dict, gpu_fallback: str | None = None) -> None:
    """Run ``bench`` against ``url``: the schedule options ``plan`` (:func:`_bench_plan`),
    the engine settings ``given`` (``gpu`` else the sampled GPU's nvidia-smi name, else
    ``gpu_fallback``), the other bench options ``o``."""
    import json
    import sys

    from archive.importers.serving import import_tracer_bench
    from tracer import bench as load
    from tracer.client import ServerError, VLLMClient
    from tracer.ssh import SSHError

    folder = Path(o["output"])
    if sampler:
        sampler.spool, sampler.tags = folder / "gpu_samples.jsonl", {"run_id": folder.name}
    try:
        client = VLLMClient(url, key, o["timeout_s"])
        models = client.models()
        served = model or models[0]["id"]
        limit = client.max_model_len(served, models)
        engine = {**given, "llm": given.get("llm") or served, "model": served,
                  "version": given.get("version") or client.version() or "unknown",
                  **({"max_model_len": limit} if limit and "max_model_len" not in given
                     else {})}
        reported = client.cache_config()
        _agree(given, reported, "the server's /metrics")
        engine.update(reported, **({"from_server": sorted(reported)} if reported else {}))
        schedule = _bench_schedule(o["trace"], plan, client, served)
        salted = o["cache_salt"] == "request" or (
            o["cache_salt"] == "auto" and plan["workload"] not in ("shared-prefix", "sessions"))
        engine["cache_salt"] = "per request" if salted else "none"
        click.echo(f"plan: {load.estimate(schedule)}", err=True)
        with tqdm(total=len(schedule), unit="req", disable=None, desc="bench") as bar:
            records = load.run(url, key, served, schedule, folder, o["max_concurrency"],
                               o["warmup"], o["timeout_s"], lambda r: bar.update(1), sampler,
                               salted, o["resume"], limit)
    except (ServerError, SSHError) as exc:
        raise InputError(str(exc)) from None
    engine.setdefault("gpu", sampler.gpu_name if sampler and sampler.gpu_name
                      else gpu_fallback)
    (folder / "engine.json").write_text(json.dumps(engine, indent=2) + "\n")
    extra = _write_samples(sampler, folder) if sampler else ()
    import_tracer_bench(folder / "requests.jsonl", folder, folder / "engine.json",
                        source=f"tracer bench against {served}", extra_files=extra)
    summary = load.summary(records)
    _print_summary(summary, sampler, folder)
    if summary["failed"] and not o["allow_failures"]:
        sys.exit(1)


def _print_summary(s: dict, sampler, folder: Path) -> None:
    """``vllm bench serve``'s summary table, the samples' gaps and what was written."""
    click.echo(f"{s['requests'] - s['failed']} of {s['requests']} requests succeeded in "
               f"{s['duration_s']:.1f} s ({s['request_throughput_req_s'] or 0:.2f} req/s)")
    for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        if s[metric]:
            click.echo(f"  {metric[:-2].upper():<5} mean {s[metric]['mean'] * 1e3:9.2f} ms   "
                       f"median {s[metric]['median'] * 1e3:9.2f} ms   p99 "
                       f"{s[metric]['p99'] * 1e3:9.2f} ms")
    for reason, n in s["failures"].items():
        click.echo(f"  failed: {n} × {reason}")
    for gap in sampler.gaps if sampler else ():
        click.echo(f"GPU samples: {gap}", err=True)
    click.echo(f"wrote {folder} (requests.jsonl, requests.parquet"
               f"{', gpu_samples.parquet' if sampler else ''}, dataset.json)")


def _check_workload_options(trace: str | None, o: dict) -> None:
    """Reject the schedule options that would have no effect (one line each)."""
    fixed_only = ("request_rate", "burstiness", "input_len", "output_len", "seed", "stages",
                  "workload", "prefix_groups", "prefix_len", "turns", "think_time",
                  "prompt_file")
    if trace is not None:
        given = next((k for k in fixed_only if o[k] is not None), None)
        if given:
            raise InputError(f"--{given.replace('_', '-')} has no effect with --trace "
                             "(its arrivals and sizes are replayed)",
                             field=given.replace("_", "-"))
        return
    if o["rate_scale"] is not None:
        raise InputError("--rate-scale has no effect without --trace", field="rate-scale")
    if (o["workload"] == "prompts") != (o["prompt_file"] is not None):
        raise InputError("--workload prompts and --prompt-file go together", field=(
            "prompt-file" if o["prompt_file"] is None else "workload"))
    if o["workload"] == "prompts" and o["input_len"] is not None:
        raise InputError("--input-len has no effect with --workload prompts (the file's "
                         "prompts are sent)", field="input-len")
    for name, workload in (("prefix_groups", "shared-prefix"), ("prefix_len", "shared-prefix"),
                           ("turns", "sessions"), ("think_time", "sessions")):
        if o[name] is not None and o["workload"] != workload:
            raise InputError(f"--{name.replace('_', '-')} needs --workload {workload}",
                             field=name.replace("_", "-"))
    if o["stages"] is not None and (o["request_rate"] is not None
                                    or o["workload"] not in (None, "fixed")):
        raise InputError("--stages replaces --request-rate (and works with the fixed "
                         "workload)", field="stages")


def _bench_schedule(trace: str | None, o: dict, client, model: str):
    """The schedule the options describe (:mod:`tracer.workloads`)."""
    from tracer import workloads

    if trace is not None:
        from archive import read_trace

        table = read_trace(trace).table
        zero = int((table.column("n_output_tokens").to_numpy()[:o["num_prompts"]] == 0).sum())
        if zero:          # vLLM needs max_tokens >= 1: trace_schedule asks for one token
            click.echo(f"warning: {zero:,} request{'s' if zero > 1 else ''} of the trace with "
                       "0 output tokens sent with max_tokens 1 (vLLM needs at least 1)",
                       err=True)
        return workloads.trace_schedule(table, o["num_prompts"],
                                        1.0 if o["rate_scale"] is None else o["rate_scale"])
    rate = 1.0 if o["request_rate"] is None else o["request_rate"]
    burst = 1.0 if o["burstiness"] is None else o["burstiness"]
    seed = o["seed"] or 0
    out_len = o["output_len"] or 128
    if o["workload"] == "prompts":
        return workloads.prompts_schedule(
            o["records"], lambda text: client.tokenize(model, text),
            o["num_prompts"], rate, o["output_len"], burst, seed)
    if o["workload"] == "sessions":
        return workloads.sessions_schedule(
            lambda text, n: client.prompt_tokens(model, n, text + " "), o["num_prompts"],
            o["turns"] or 3, rate, o["input_len"] or 128, out_len, o["think_time"] or 0.0,
            burst, seed)
    if o["workload"] == "shared-prefix":
        return workloads.shared_prefix_schedule(
            lambda text, n: client.prompt_tokens(model, n, text + " "), o["num_prompts"],
            rate, o["prefix_groups"] or 8, o["prefix_len"] or 1024, o["input_len"] or 128,
            out_len, burst, seed)
    if o["stages"] is not None:
        return workloads.stages_schedule(workloads.parse_stages(o["stages"]),
                                         o["input_len"] or 512, out_len, burst, seed)
    return workloads.poisson_schedule(o["num_prompts"], rate, o["input_len"] or 512, out_len,
                                      burst, seed)


def _write_samples(sampler, folder: Path) -> tuple[Path, Path]:
    """``gpu_samples.parquet`` from the sampler's spool (the archive's GPU-samples table,
    ``archive/schema.py``); returns it and the spool."""
    import pyarrow.parquet as pq

    fields = ("power.draw.instant",) if sampler.power_field == "power.draw.instant" else ()
    pq.write_table(samples_table(sampler.spooled(), folder.name, fields),
                   folder / "gpu_samples.parquet")
    return folder / "gpu_samples.parquet", folder / "gpu_samples.jsonl"


def cluster_options(command):
    """Where and how ``serve`` and ``run`` start vLLM."""
    options = [
        click.option("--cluster", "profile_path", required=True,
                     type=click.Path(dir_okay=False),
                     help="Cluster profile (TOML; see tracer/clusters/example-slurm.toml)."),
        click.option("--model", required=True,
                     help="Model for vllm serve (e.g. a Hugging Face id)."),
        click.option("--gpu", required=True, help="GPU type for the GRES request (e.g. A100)."),
        click.option("--dtype", default="auto", show_default=True, help="vllm serve --dtype."),
        click.option("--vllm-args", default="",
                     help="More vllm serve arguments, appended to the profile's command and "
                          "recorded (e.g. '--max-num-seqs 64 --enable-prefix-caching')."),
        click.option("--time", "time_limit", default=None,
                     help="Slurm time limit [the profile's]; it also bounds a job whose "
                          "tracer was killed with SIGKILL."),
        click.option("--ssh-key", type=click.Path(dir_okay=False), default=None,
                     help="Private key file [default: the config's IdentityFile, else the "
                          "SSH agent]."),
        click.option("--ssh-config", type=click.Path(dir_okay=False), default=None,
                     help="SSH config file for aliases [default: ~/.ssh/config]."),
        click.option("--known-hosts", type=click.Path(dir_okay=False), default=None,
                     help="known_hosts file [default: ~/.ssh/known_hosts]."),
        click.option("--accept-unknown-host", is_flag=True,
                     help="Trust a host key not in known_hosts (first contact only; prefer "
                          "adding it)."),
        click.option("--poll", "poll_s", type=Number(min=0.01), default=5.0,
                     show_default=True, help="Seconds between squeue and /health checks."),
        click.option("--start-timeout", type=Number(min=0, min_open=True),
                     default=3600.0, show_default=True,
                     help="Seconds to wait for the job to run, and again for /health."),
    ]
    return _decorated(command, options)


def _launch(c: dict):
    """The profile, its job script and the launch's engine settings (vLLM's argument names,
    the command line under ``launch_command``) for the cluster options ``c`` (popped)."""
    from tracer.slurm import ENGINE_FROM_LAUNCH, ClusterProfile, launch_settings

    profile = ClusterProfile.read(c.pop("profile_path"))
    model, gpu, dtype, extra = c.pop("model"), c.pop("gpu"), c.pop("dtype"), c.pop("vllm_args")
    command = profile.vllm_command(model, gpu, dtype, extra)
    args = launch_settings(command)
    engine = {"model": args.get("served_model_name", model), "launch_command": command,
              **{k: args[k] for k in ENGINE_FROM_LAUNCH if k in args}}
    return profile, profile.job_script(model, gpu, dtype, c.pop("time_limit"), extra), engine


def _job(profile, c: dict):
    """The :class:`~tracer.slurm.SlurmJob` for the SSH options in ``c`` (popped)."""
    from tracer.slurm import SlurmJob

    target = profile.target(c.pop("ssh_key"), c.pop("known_hosts"), c.pop("accept_unknown_host"),
                            c.pop("ssh_config"))
    return SlurmJob(profile, target)


def _start(job, script: str, poll_s: float, timeout_s: float) -> str:
    """Submit, wait until running and healthy; returns vLLM's URL as the login node sees it."""
    job.submit(script)
    click.echo(f"submitted job {job.job_id} on {job.profile.name}", err=True)
    job.wait_running(timeout_s, poll_s)
    url = job.wait_healthy(timeout_s, poll_s)
    click.echo(f"vLLM is up: {url} (job {job.job_id} on {job.node})", err=True)
    return url


@main.command()
@cluster_options
@click.option("--detach", is_flag=True,
              help="Print the URL and job id and leave the job running (scancel it yourself).")
@click.option("--engine-out", type=click.Path(dir_okay=False), default=None,
              help="Write the launch's engine settings (and its command line) here, for "
                   "tracer bench --engine.")
@clean_errors
def serve(detach, engine_out, **c):
    """Start vLLM on a Slurm GPU node, wait for /health, and cancel the job on Ctrl-C."""
    import json
    import time

    from tracer.ssh import SSHError

    poll_s, timeout_s = c.pop("poll_s"), c.pop("start_timeout")
    profile, script, engine = _launch(c)
    job = _job(profile, c)
    try:
        with job, _cancel_on_signals():
            url = _start(job, script, poll_s, timeout_s)
            if engine_out:
                Path(engine_out).write_text(json.dumps(
                    {**engine, "job_id": job.job_id, "node": job.node, "url": url},
                    indent=2) + "\n")
            click.echo(url)
            if detach:
                job.job_id = None           # leave it running
                return
            click.echo("press Ctrl-C to cancel the job", err=True)
            while True:
                time.sleep(60)
    except SSHError as exc:
        raise InputError(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("cancelled", err=True)


@main.command()
@cluster_options
@click.option("--engine", "engine_file", type=click.Path(dir_okay=False), default=None,
              help="JSON of engine settings the launch command does not give (gpu as in the "
                   "Kavier library, max_num_seqs, ...); a setting given both ways must agree.")
@click.option("--gpu-samples/--no-gpu-samples", default=True, show_default=True,
              help="Sample nvidia-smi on the job's node, over SSH through the login node.")
@click.option("--gpu-index", default=None,
              help="GPUs to sample [default: the job's, from scontrol show job -d].")
@click.option("--loop-ms", type=click.IntRange(min=10), default=100, show_default=True,
              help="nvidia-smi sampling interval, ms.")
@click.option("--dcgm-port", type=click.IntRange(1, 65535), default=None,
              help="Scrape the DCGM exporter listening on this port of the job's node "
                   "(through the login node) instead of running nvidia-smi over SSH.")
@bench_options
@api_key_options
@clean_errors
def run(engine_file, gpu_samples, gpu_index, loop_ms, dcgm_port, api_key_env, api_key_file,
        **o):
    """tracer serve + bench in one: start vLLM on a Slurm node, wait for /health, run the
    bench schedule through a port forward via the login node, sample the node's GPUs, and
    cancel the job on every way out (end, failure, Ctrl-C, SIGTERM, SIGHUP)."""
    from contextlib import nullcontext
    from dataclasses import replace

    from archive.errors import read_json_object
    from tracer.sampler import NvidiaSmiSampler
    from tracer.ssh import SSHError, SSHTarget

    poll_s, timeout_s, gpu = o.pop("poll_s"), o.pop("start_timeout"), o["gpu"]
    for name, value in (("gpu-index", gpu_index), ("dcgm-port", dcgm_port)):
        if value is not None and not gpu_samples:
            raise InputError(f"--{name} has no effect with --no-gpu-samples", field=name)
    given = read_json_object(engine_file, "engine settings file") if engine_file else {}
    ssh = (o["ssh_key"], o["known_hosts"], o["accept_unknown_host"], None,
           o["ssh_config"])                       # for the node as for the login node
    profile, script, engine = _launch(o)          # the cluster options are popped from o
    _agree(given, {k: v for k, v in engine.items() if k != "model"}, "the vLLM command",
           engine_file)
    engine = {**engine, **given}
    plan = _bench_plan(o, engine, gpu_known=True)
    indices = _gpu_indices(gpu_index)
    job = _job(profile, o)
    try:
        with job, _cancel_on_signals():
            _start(job, script, poll_s, timeout_s)
            sampler, gpus = None, indices or (job.gpu_indices() if gpu_samples else None)
            dcgm = job.forward(dcgm_port) if dcgm_port else nullcontext()
            with job.forward() as forward, dcgm:
                if dcgm_port:
                    sampler = NvidiaSmiSampler(None, loop_ms, gpus,
                                               dcgm_url=f"{dcgm.url}/metrics")
                elif gpu_samples:
                    node = replace(SSHTarget.parse(job.node, *ssh, job.target.user),
                                   jump=job.target)
                    sampler = NvidiaSmiSampler(node, loop_ms, gpus)
                try:
                    _bench(forward.url, plan, engine, engine["model"],
                           _api_key(api_key_env, api_key_file), sampler, o, gpu_fallback=gpu)
                finally:
                    for failure in forward.failures:
                        click.echo(f"port forward through {profile.login}: {failure}", err=True)
    except SSHError as exc:
        raise InputError(str(exc)) from None
    finally:
        if job.job_id:                      # the job's exit could not scancel it
            click.echo(f"job {job.job_id} may still run on {profile.name}: scancel it",
                       err=True)
        elif job.node:
            click.echo(f"job cancelled ({profile.name}, node {job.node})", err=True)


def _agree(given: dict, found: dict, source: str, path=None) -> None:
    """Refuse engine settings ``given`` (from the file ``path``, else the ``--engine`` ones)
    that contradict what ``source`` says (``found``).

    Raises
    ------
    InputError
        Naming the setting and both values.
    """
    subject = "says" if path else "the engine settings say"
    for key in sorted(set(given) & set(found)):
        if given[key] != found[key]:
            raise InputError(f"{subject} {key} = {given[key]!r}, {source} {found[key]!r}",
                             path=path, field=key)


def _gpu_indices(text: str | None) -> tuple[int, ...] | None:
    try:
        return tuple(int(i) for i in text.split(",")) if text else None
    except ValueError:
        raise InputError(f"expected comma-separated GPU indices, got {text!r}",
                         field="gpu-index") from None


class _cancel_on_signals:  # noqa: N801 - used as a context manager, like contextlib's
    """Turn SIGTERM and SIGHUP (Slurm's or a closed terminal's) into KeyboardInterrupt while
    a job is held, so that the job's ``with`` block cancels it on those ways out too."""

    SIGNALS = ("SIGTERM", "SIGHUP")

    def __enter__(self):
        import signal

        def interrupt(signum, frame):
            raise KeyboardInterrupt(signal.Signals(signum).name)

        self._old = {name: signal.signal(getattr(signal, name), interrupt)
                     for name in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for name, handler in self._old.items():
            signal.signal(getattr(signal, name), handler)
