"""Import serving runs (requests measured under load) into archive datasets.

Two formats:

* ``llmservingsim``: the folders LLMServingSim (casys-kaist/LLMServingSim, ``bench/examples``)
  records with vLLM: ``requests.jsonl`` (``request_id, input_toks, output_toks, arrival_time``
  and the engine's monotonic ``queued_ts, scheduled_ts, first_token_ts, last_token_ts``),
  ``meta.json`` (``engine_kwargs``, optional ``kv_cache`` and ``hardware``) and
  ``timeseries.csv`` (``t, prompt_throughput, gen_throughput, running, waiting,
  kv_cache_pct``), plus optionally the workload file that was sent (JSON Lines with
  ``input_tok_ids``), from which the prompts' prefix-block hashes are computed. Latencies are
  the engine's (TTFT = first_token − queued, as LLMServingSim scores them).
* ``tracer-bench``: the ``requests.jsonl`` of ``tracer bench`` (:func:`import_tracer_bench`).
* ``vllm-bench``: the JSON ``vllm bench serve --save-result --save-detailed`` writes
  (``input_lens, output_lens, ttfts, itls, start_times, errors``; vLLM
  ``vllm/benchmarks/serve.py``). Latencies are the client's; the engine settings the result
  does not record come from a JSON file of :data:`archive.serving.ENGINE_KEYS`.

Each import writes ``requests.parquet`` (:data:`archive.schema.SERVING`), ``timeseries.parquet``
where there is one, the source files, ``dataset.json`` and the card.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from archive.cards import finish
from archive.errors import InputError, read_json_object, shown
from archive.schema import SERVING, SERVING_TIMESERIES
from archive.serving import ENGINE_KEYS
from archive.traces import token_column

VLLM_DEFAULTS = {"name": "vLLM", "tensor_parallel_size": 1, "block_size": 16,
                 "num_gpu_blocks": None, "enable_prefix_caching": True,
                 "enable_chunked_prefill": True}
"""vLLM V1's defaults for the engine settings a run may not record (``--block-size`` 16;
prefix caching and chunked prefill on in V1; the pool size unknown)."""
HASH_BLOCK_SIZE = 16
"""Tokens per prefix-block hash computed from token ids (vLLM's default block)."""


def json_lines(path: Path) -> list[dict]:
    """The JSON objects of a JSON Lines request log, one per non-empty line.

    Raises
    ------
    InputError
        For a line that is not a JSON object (naming it), or a log without requests.
    """
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"not valid JSON: {exc.msg}", path=path, row=i) from None
            if not isinstance(row, dict):
                raise InputError("expected a JSON object", path=path, row=i)
            rows.append(row)
    if not rows:
        raise InputError("no requests", path=path)
    return rows


def _numbers(rows: list[dict], key: str, path: Path) -> np.ndarray:
    """Column ``key`` of JSON rows as a float array, naming the first bad row."""
    out = np.empty(len(rows))
    for i, row in enumerate(rows):
        value = row.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(
                value):
            raise InputError(f"expected a finite number, got {value!r}", path=path, row=i + 1,
                             field=key)
        out[i] = value
    return out


def _tokens(rows: list[dict], key: str, path: Path) -> np.ndarray:
    """Token counts of JSON rows as int64, checked as every archive reader checks them
    (:func:`archive.traces.token_column`: integers from 0 to ``MAX_TOKENS``)."""
    return token_column(_numbers(rows, key, path), path, key, 1)


def block_hashes(token_ids, block_size: int = HASH_BLOCK_SIZE) -> list[int]:
    """Chained prefix-block hashes of a prompt: one per block of ``block_size`` token ids (the
    last possibly partial), each the low 63 bits of a BLAKE2b of the previous hash and the
    block's ids (non-negative, as archive hash ids are), so two prompts share their first ``k``
    hashes exactly when they share their first ``k`` blocks (vLLM's block hashing,
    ``vllm/v1/core/kv_cache_utils.py``, with BLAKE2b)."""
    ids = np.asarray(token_ids, np.int64)
    out, previous = [], b""
    for start in range(0, ids.size, block_size):
        digest = hashlib.blake2b(previous + ids[start:start + block_size].tobytes(),
                                 digest_size=8).digest()
        out.append(int.from_bytes(digest, "little") & (2**63 - 1))
        previous = digest
    return out


def _requests_table(columns: dict) -> pa.Table:
    n = len(columns["request_id"])
    full = {f.name: columns.get(f.name, [None] * n) for f in SERVING}
    return pa.Table.from_pydict(full, schema=SERVING)


def _latencies(arrival, first, last, n_out) -> dict:
    with np.errstate(divide="ignore", invalid="ignore"):
        tpot = np.where(n_out > 1, (last - first) / (n_out - 1), np.nan)
    return {"ttft_s": first - arrival, "tpot_s": tpot, "e2e_s": last - arrival}


def _nan_to_none(values) -> list:
    return [None if v is None or (isinstance(v, float) and np.isnan(v)) else v for v in values]


def _write(dest: Path, requests: pa.Table, timeseries: pa.Table | None, sources: list[Path],
           meta: dict) -> dict:
    dest.mkdir(parents=True, exist_ok=True)
    files = ["requests.parquet"]
    tmp = dest / "requests.parquet.partial"
    pq.write_table(requests, tmp)
    tmp.replace(dest / "requests.parquet")
    if timeseries is not None:
        pq.write_table(timeseries, dest / "timeseries.parquet")
        files.append("timeseries.parquet")
    for src in sources:
        if src.resolve() != (dest / src.name).resolve():
            shutil.copyfile(src, dest / src.name)
        files.append(src.name)
    return finish(dest, {**meta, "kind": "serving", "main_table": "requests.parquet",
                         "files": files})


def _engine(given: dict, path: Path) -> dict:
    """The engine section: ``given`` completed with :data:`VLLM_DEFAULTS`, the keys filled in
    listed under ``assumed``."""
    assumed = sorted(k for k in VLLM_DEFAULTS
                     if given.get(k) is None and k not in ("name", "num_gpu_blocks"))
    engine = {**VLLM_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    missing = [k for k in ENGINE_KEYS if k not in engine]
    if missing:
        raise InputError(f"the run does not record engine setting(s) {missing}", path=path)
    return {**engine, "assumed": assumed}


def import_llmservingsim(src: str | Path, dest: str | Path, name: str | None = None,
                         gpu: str | None = None, workload: str | Path | None = None,
                         licence: str = "see source", source: str | None = None) -> dict:
    """Import an LLMServingSim vLLM run folder; returns the dataset metadata.

    Parameters
    ----------
    src : folder with ``requests.jsonl`` and ``meta.json`` (``timeseries.csv`` optional)
    dest : dataset folder to write
    gpu : GPU name when ``meta.json`` has no ``hardware.device_name``
    workload : the JSON Lines file that was sent (``input_tok_ids``), for prefix hashes

    Raises
    ------
    InputError
        Missing files or fields, bad values (naming file, line and field), no GPU name, or a
        workload whose prompts do not match the requests.
    """
    src, dest = Path(src), Path(dest)
    req_path, meta_path = src / "requests.jsonl", src / "meta.json"
    for path in (req_path, meta_path):
        if not path.is_file():
            raise InputError("missing (an LLMServingSim run folder has requests.jsonl and "
                             "meta.json)", path=path)
    rows, meta = json_lines(req_path), read_json_object(meta_path, "meta.json")
    n_in, n_out = (_tokens(rows, key, req_path) for key in ("input_toks", "output_toks"))
    queued, scheduled, first, last = (_numbers(rows, k, req_path) for k in (
        "queued_ts", "scheduled_ts", "first_token_ts", "last_token_ts"))
    zero = queued.min()
    columns = {"request_id": [str(r.get("request_id", i)) for i, r in enumerate(rows)],
               "arrival_s": queued - zero, "n_input_tokens": n_in, "n_output_tokens": n_out,
               "scheduled_s": scheduled - zero, "first_token_s": first - zero,
               "last_token_s": last - zero, **_latencies(queued, first, last, n_out)}
    columns["tpot_s"] = _nan_to_none(columns["tpot_s"])
    if workload is not None:
        columns["hash_ids"] = _workload_hashes(Path(workload), n_in)
    kwargs, kv = meta.get("engine_kwargs") or {}, meta.get("kv_cache") or {}

    def resolved(section: str, key: str):
        """``resolved_config.section.key`` of vLLM's resolved configuration, or None."""
        return ((meta.get("resolved_config") or {}).get(section) or {}).get(key)

    recorded = (meta.get("hardware") or {}).get("device_name")
    if recorded and gpu and gpu.strip().lower() != str(recorded).strip().lower():
        raise InputError(f"meta.json records hardware.device_name {recorded!r}; --gpu {gpu!r} "
                         "is for a run that does not record it", path=meta_path,
                         field="hardware.device_name")
    device = recorded or gpu
    if device is None:
        raise InputError("meta.json records no hardware.device_name; pass --gpu", path=meta_path,
                         field="hardware.device_name")
    engine = _engine({
        "version": meta.get("vllm_version"), "model": meta.get("model"),
        "llm": meta.get("model"), "gpu": device,
        "gpu_count": (kwargs.get("tensor_parallel_size") or 1)
        * (kwargs.get("data_parallel_size") or 1),
        "dtype": kwargs.get("dtype"), "tensor_parallel_size": kwargs.get("tensor_parallel_size"),
        "pipeline_parallel_size": kwargs.get("pipeline_parallel_size")
        or resolved("parallel_config", "pipeline_parallel_size"),
        "data_parallel_size": kwargs.get("data_parallel_size"),
        "kv_cache_dtype": kwargs.get("kv_cache_dtype") or resolved("cache_config", "cache_dtype"),
        "quantization": kwargs.get("quantization") or resolved("model_config", "quantization"),
        "async_scheduling": kwargs.get("async_scheduling",
                                       resolved("scheduler_config", "async_scheduling")),
        "enable_expert_parallel": kwargs.get("enable_expert_parallel"),
        "max_num_seqs": kwargs.get("max_num_seqs"),
        "max_num_batched_tokens": kwargs.get("max_num_batched_tokens"),
        "block_size": kv.get("block_size"), "num_gpu_blocks": kv.get("num_gpu_blocks"),
        "gpu_memory_utilization": kv.get("gpu_memory_utilization"),
        "enable_prefix_caching": kv.get("enable_prefix_caching"),
        "enable_chunked_prefill": resolved("scheduler_config", "enable_chunked_prefill"),
        "timestamps": "engine"}, meta_path)
    series_path = src / "timeseries.csv"
    timeseries = _timeseries(series_path) if series_path.is_file() else None
    sources = [p for p in (req_path, meta_path, series_path) if p.is_file()]
    return _write(dest, _requests_table(columns), timeseries, sources, {
        "name": name or dest.name, "version": "1.0.0",
        "title": f"vLLM {engine['version']} serving {engine['model']} on {device} "
                 f"({len(rows)} requests)",
        "description": f"{len(rows):,} requests served under load by vLLM "
                       f"{engine['version']} ({engine['model']}, {device}, max_num_seqs "
                       f"{engine['max_num_seqs']}, max_num_batched_tokens "
                       f"{engine['max_num_batched_tokens']}); the engine's per-request "
                       "timestamps, recorded by LLMServingSim's benchmark harness.",
        "creators": ["see source"], "licence": licence, "source": source or str(src),
        "citation": "see source", "engine": engine, "time_origin": "the first queued request",
        **({"hash_block_size": HASH_BLOCK_SIZE} if workload is not None else {})})


def _workload_hashes(path: Path, n_in: np.ndarray) -> list[list[int]]:
    rows = json_lines(path)
    if len(rows) != n_in.size:
        raise InputError(f"{len(rows)} workload requests for {n_in.size} measured ones",
                         path=path)
    out = []
    for i, (row, expected) in enumerate(zip(rows, n_in, strict=True)):
        ids = row.get("input_tok_ids")
        if not isinstance(ids, list) or len(ids) != expected:
            got = len(ids) if isinstance(ids, list) else ids
            raise InputError(f"expected {expected} token ids (input_toks of the request), got "
                             f"{got!r}", path=path, row=i + 1, field="input_tok_ids")
        out.append(block_hashes(ids))
    return out


def _timeseries(path: Path) -> pa.Table:
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read as CSV: {exc}", path=path) from None
    renames = {"t": "t_s", "prompt_throughput": "prompt_throughput_tok_s",
               "gen_throughput": "generation_throughput_tok_s",
               "running": "num_requests_running", "waiting": "num_requests_waiting",
               "kv_cache_pct": "kv_cache_usage_pct"}
    missing = [c for c in renames if c not in df.columns]
    if missing:
        raise InputError(f"missing column(s) {missing}", path=path)
    df = df.rename(columns=renames)[list(renames.values())]
    for column in df.columns:
        values = pd.to_numeric(df[column], errors="coerce")
        if values.isna().any() or (values < 0).any():
            i = int((values.isna() | (values < 0)).to_numpy().argmax())
            raise InputError(f"expected a non-negative number, got {shown(df[column].iloc[i])}",
                             path=path, row=i + 2, field=column)
        df[column] = values
    return pa.Table.from_pandas(df, schema=SERVING_TIMESERIES, preserve_index=False)


def _client_run(src: Path, dest: Path, rows: list[dict], sizes: tuple[str, str], start,
                first, last, itls, errors, engine: dict, meta: dict,
                extra: list[Path] = (), hashes: list[list[int]] | None = None) -> dict:
    """Write a run timed by a benchmark client: its ``rows`` with the prompt and output
    token counts under the keys ``sizes``, absolute ``start``, ``first`` and ``last`` token
    times (s, NaN when the request failed), per-request ITL lists (or None) and error texts
    (None on success); ``extra`` files go with it, ``hashes`` are the prompts' block hashes
    when recorded."""
    n_in, n_out = (_tokens(rows, key, src) for key in sizes)
    first, last = np.asarray(first, np.float64), np.asarray(last, np.float64)
    _check_timings(src, np.asarray(start, np.float64), first, last, itls, errors)
    zero = float(np.nanmin(start))
    arrival, first, last = start - zero, first - zero, last - zero
    columns = {"request_id": [str(i) for i in range(len(start))], "arrival_s": arrival,
               "n_input_tokens": n_in, "n_output_tokens": n_out,
               "first_token_s": _nan_to_none(first), "last_token_s": _nan_to_none(last),
               **{k: _nan_to_none(v) for k, v in
                  _latencies(arrival, first, last, n_out).items()},
               "itl_s": itls, "error": errors}
    if hashes is not None:
        columns["hash_ids"] = hashes
    failed = sum(e is not None for e in errors)
    return _write(dest, _requests_table(columns), None, [src, *extra], {
        **meta, "version": "1.0.0", "engine": engine, "time_origin": "the first request sent",
        "title": f"{meta['title']}: {engine['llm']} on {engine['gpu']} ({len(start)} requests)",
        "description": f"{len(start):,} requests ({failed} failed) {meta['description']}; "
                       "client-side timings.",
        "creators": ["see source"], "citation": "see source"})


def _check_timings(src: Path, start: np.ndarray, first: np.ndarray, last: np.ndarray,
                   itls: list, errors: list) -> None:
    """Refuse a successful request (no error) whose inter-token gaps are not finite and
    non-negative, whose first token is not a finite time at or after its send, or whose last
    token is not a finite time at or after its first (a benchmark's NaN or inf would become a
    latency).

    Raises
    ------
    InputError
        Naming the request (1-based) and the quantity.
    """
    ok = np.array([e is None for e in errors], bool)
    for i, gaps in enumerate(itls):
        values = np.asarray(gaps if gaps is not None else [], np.float64)
        good = (values >= 0) & (values < np.inf)
        if ok[i] and not good.all():
            raise InputError(f"inter-token gaps must be finite and non-negative, got "
                             f"{float(values[~good][0])}", path=src, row=i + 1, field="itl")
    ttft, e2e = first - start, last - start
    for field, bad in (("ttft", ok & ~((ttft >= 0) & (ttft < np.inf))),
                       ("e2e", ok & ~((e2e >= ttft) & (e2e < np.inf)))):
        if bad.any():
            i = int(bad.argmax())
            raise InputError(f"a successful request needs a finite TTFT >= 0 and E2E >= TTFT, "
                             f"got TTFT {float(ttft[i])} s, E2E {float(e2e[i])} s", path=src,
                             row=i + 1, field=field)


def _client_engine(given: dict, model, engine_file) -> dict:
    return _engine({"model": model, "llm": model, **given, "timestamps": "client"},
                   Path(engine_file))


def import_vllm_bench(src: str | Path, dest: str | Path, engine_file: str | Path,
                      name: str | None = None, licence: str = "see source",
                      source: str | None = None) -> dict:
    """Import a ``vllm bench serve --save-result --save-detailed`` JSON; returns the metadata.

    ``engine_file`` is a JSON object with the engine settings the result does not record
    (:data:`archive.serving.ENGINE_KEYS`; at least ``gpu``, ``version``, ``max_num_seqs`` and
    ``max_num_batched_tokens``; ``llm`` defaults to the result's ``model_id``). Requests are
    timed from the client's send (``start_times``): TTFT as measured, E2E = TTFT + Σ ITL.

    Raises
    ------
    InputError
        Missing or ragged per-request lists, bad values, or missing engine settings.
    """
    src, dest = Path(src), Path(dest)
    result = read_json_object(src, "benchmark result")
    given = read_json_object(engine_file, "engine settings file")
    keys = ("input_lens", "output_lens", "ttfts", "itls", "start_times")
    for key in keys:
        if not isinstance(result.get(key), list):
            raise InputError("missing: save the result with --save-detailed", path=src,
                             field=key)
    n = len(result["input_lens"])
    for key in keys:
        if len(result[key]) != n:
            raise InputError(f"{len(result[key])} values for {n} requests", path=src, field=key)
    errors = [str(e) if e else None for e in (result.get("errors") or [""] * n)]
    rows = [{k: result[k][i] for k in keys} for i in range(n)]
    start = _numbers(rows, "start_times", src)
    ttft = np.array([np.nan if errors[i] else float(r["ttfts"]) for i, r in enumerate(rows)])
    itl_sum = np.array([np.nan if errors[i] else float(np.sum(r["itls"]))
                        for i, r in enumerate(rows)])
    itls = [None if errors[i] else [float(x) for x in r["itls"]] for i, r in enumerate(rows)]
    return _client_run(
        src, dest, rows, ("input_lens", "output_lens"), start, start + ttft,
        start + ttft + itl_sum, itls, errors,
        _client_engine(given, result.get("model_id"), engine_file),
        {"name": name or dest.name, "title": "vllm bench serve", "licence": licence,
         "source": source or str(src),
         "description": f"sent by vllm bench serve (request rate {result.get('request_rate')}, "
                        f"max concurrency {result.get('max_concurrency')})"})


def import_inference_perf(src: str | Path, dest: str | Path, engine_file: str | Path,
                          name: str | None = None, licence: str = "see source",
                          source: str | None = None) -> dict:
    """Import inference-perf's ``per_request_lifecycle_metrics.json`` (kubernetes-sigs/
    inference-perf, ``report.request_lifecycle.per_request``): a list of ``{start_time,
    end_time, info: {input_tokens, output_tokens, output_token_times}, error}``. TTFT is the
    first output token time − ``start_time``, the last token time ends the request (else
    ``end_time``), ITLs are the gaps between token times. Engine settings as
    :func:`import_vllm_bench` (``llm`` is required there: the file does not name the model).

    Raises
    ------
    InputError
        Not a list of request objects, missing fields or bad values (naming the request).
    """
    src, dest = Path(src), Path(dest)
    import json

    try:
        records = json.loads(src.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"not readable as JSON: {exc}", path=src) from None
    if not isinstance(records, list) or not records:
        raise InputError("expected a non-empty list of per-request records", path=src)
    given = read_json_object(engine_file, "engine settings file")
    rows, itls, errors, first, last = [], [], [], [], []
    for i, r in enumerate(records):
        info = r.get("info") if isinstance(r, dict) else None
        if not isinstance(info, dict):
            raise InputError("a record needs an info object", path=src, row=i + 1, field="info")
        rows.append({"start_time": r.get("start_time"), "end_time": r.get("end_time"),
                     "input_tokens": info.get("input_tokens"),
                     "output_tokens": info.get("output_tokens")})
        times = info.get("output_token_times") or []
        error = r.get("error")
        if isinstance(error, dict):             # inference-perf's ErrorResponseInfo
            error = error.get("error_msg") or error.get("error_type") or str(error)
        errors.append(str(error) if error else None)
        ok = errors[-1] is None and times
        first.append(float(times[0]) if ok else np.nan)
        last.append(float(times[-1]) if ok else np.nan)
        itls.append([float(b - a) for a, b in zip(times, times[1:], strict=False)]
                    if ok else None)
    start = _numbers(rows, "start_time", src)
    return _client_run(
        src, dest, rows, ("input_tokens", "output_tokens"), start, first, last, itls, errors,
        _client_engine(given, given.get("llm"), engine_file),
        {"name": name or dest.name, "title": "inference-perf", "licence": licence,
         "source": source or str(src), "description": "sent by inference-perf"})


def import_guidellm(src: str | Path, dest: str | Path, engine_file: str | Path,
                    benchmark: int | None = None, name: str | None = None,
                    licence: str = "see source", source: str | None = None) -> dict:
    """Import one benchmark of a guidellm report (``guidellm benchmark --output-path
    report.json``; vllm-project/guidellm ``GenerativeBenchmark``): its ``requests``
    (``successful``, ``incomplete``, ``errored``) of ``GenerativeRequestStats``, with
    ``prompt_tokens``, ``output_tokens`` and ``info.timings`` (``request_start``,
    ``first_token_iteration``, ``last_token_iteration``, ``request_end``). Incomplete and
    errored requests are kept as failed. ``benchmark`` picks one of several (a sweep).

    Raises
    ------
    InputError
        No benchmarks, several without ``benchmark``, or records without timings.
    """
    src, dest = Path(src), Path(dest)
    report = read_json_object(src, "guidellm report")
    benchmarks = report.get("benchmarks")
    if not isinstance(benchmarks, list) or not benchmarks:
        raise InputError("no benchmarks in the report", path=src, field="benchmarks")
    if benchmark is None and len(benchmarks) > 1:
        raise InputError(f"the report holds {len(benchmarks)} benchmarks; choose one with "
                         "--benchmark (0-based)", path=src, field="benchmarks")
    index = benchmark or 0
    if not 0 <= index < len(benchmarks):
        raise InputError(f"no benchmark {index} (the report holds {len(benchmarks)})",
                         path=src, field="--benchmark")
    requests = benchmarks[index].get("requests") or {}
    records = [(r, status) for status in ("successful", "incomplete", "errored")
               for r in (requests.get(status) or [])]
    if not records:
        raise InputError("the benchmark kept no per-request records", path=src,
                         field="requests")
    given = read_json_object(engine_file, "engine settings file")
    rows, errors, first, last = [], [], [], []
    for i, (r, status) in enumerate(records):
        if not isinstance(r, dict):
            raise InputError(f"{status} request {i} is not an object", path=src,
                             field="requests")
        timings = (r.get("info") or {}).get("timings") or {}
        rows.append({"start": timings.get("request_start", r.get("request_start_time")),
                     "prompt_tokens": r.get("prompt_tokens"),
                     "output_tokens": r.get("output_tokens") or 0})
        ok = status == "successful" and timings.get("first_token_iteration") is not None
        errors.append(None if ok else status)
        first.append(float(timings["first_token_iteration"]) if ok else np.nan)
        last.append(float(timings.get("last_token_iteration") or timings.get("request_end"))
                    if ok else np.nan)
    start = _numbers(rows, "start", src)
    model = (benchmarks[index].get("config") or {}).get("model") or given.get("llm")
    return _client_run(
        src, dest, rows, ("prompt_tokens", "output_tokens"), start, first, last,
        [None] * len(rows), errors,
        _client_engine(given, model, engine_file),
        {"name": name or dest.name, "title": "guidellm", "licence": licence,
         "source": source or str(src), "description": f"of guidellm benchmark {index}"})


def import_tracer_bench(src: str | Path, dest: str | Path, engine_file: str | Path,
                        name: str | None = None, licence: str = "see source",
                        source: str | None = None, extra_files: tuple = ()) -> dict:
    """Import the ``requests.jsonl`` of ``tracer bench``: one JSON object per completed
    request, ``request_id, start_s, n_input_tokens, n_output_tokens, ttft_s, itl_s, error``
    (times in seconds from the run's start, ``error`` null on success). Engine settings as
    :func:`import_vllm_bench`. ``extra_files`` (the GPU samples) are listed and
    checksummed with the run.

    Raises
    ------
    InputError
        Bad JSON lines or values (naming the line and field), or missing engine settings.
    """
    src, dest = Path(src), Path(dest)
    rows = sorted(json_lines(src), key=lambda r: float(r.get("start_s") or 0.0))
    given = read_json_object(engine_file, "engine settings file")
    start = _numbers(rows, "start_s", src)
    errors = [None if r.get("error") is None else str(r["error"]) for r in rows]
    first, last, itls = [], [], []
    for i, (row, error) in enumerate(zip(rows, errors, strict=True)):
        itl = row.get("itl_s") or []
        if error is None and (not isinstance(row.get("ttft_s"), int | float)
                              or not isinstance(itl, list)):
            raise InputError("a successful request needs ttft_s and an itl_s list", path=src,
                             row=i + 1, field="ttft_s")
        first.append(start[i] + row["ttft_s"] if error is None else np.nan)
        last.append(first[-1] + float(np.sum(itl)) if error is None else np.nan)
        itls.append([float(x) for x in itl] if error is None else None)
    hashes = _bench_hashes(rows, src)
    return _client_run(
        src, dest, rows, ("n_input_tokens", "n_output_tokens"), start, first, last, itls,
        errors, _client_engine(given, given.get("llm"), engine_file),
        {"name": name or dest.name, "title": "tracer bench", "licence": licence,
         "source": source or str(src), "description": "sent by tracer bench",
         **({"hash_block_size": HASH_BLOCK_SIZE} if hashes else {})},
        [Path(f) for f in extra_files], hashes)


def _bench_hashes(rows: list[dict], src: Path) -> list[list[int]] | None:
    """The prompts' block hashes (:func:`block_hashes`) when every request recorded them
    (``tracer bench`` does when requests share the server's prefix cache), else None.

    Raises
    ------
    InputError
        For a ``hash_ids`` that is not a list of non-negative integers.
    """
    if not rows or any("hash_ids" not in r for r in rows):
        return None
    for i, row in enumerate(rows):
        ids = row["hash_ids"]
        if not isinstance(ids, list) or not all(isinstance(x, int) and not isinstance(
                x, bool) and 0 <= x < 2**63 for x in ids):
            raise InputError("expected a list of non-negative integer block hashes",
                             path=src, row=i + 1, field="hash_ids")
    return [row["hash_ids"] for row in rows]
