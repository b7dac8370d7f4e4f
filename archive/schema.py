"""Versioned schemas of the LLM Trace Archive's tables (pyarrow), with a docstring per column.

Units live in column names (``_s`` seconds, ``_tok_s`` tokens per second). Simulators and
calibration never parse files themselves: they read through :mod:`archive` (OpenDC's habit of
keeping the trace format in its own module).
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1.2"
KNOWN_SCHEMA_VERSIONS = ("1.0", "1.1", "1.2")
"""Schema versions this toolkit reads. 1.1: measurements gained ITL/TPOT statistics, error and
run_id; workloads gained sessions, turns and prompt content; GPU samples added. 1.2: serving
runs (requests under load with the engine's configuration, and a timeseries) added. Readers
accept older tables (a subset)."""


def _field(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


MEASUREMENTS = pa.schema(
    [
        _field("setup_id", pa.string(), "Identifier of the measured setup (cluster, GPU, engine, "
               "model, settings); rows with the same setup_id are comparable."),
        _field("provider", pa.string(), "Where it ran: cluster or cloud (e.g. SURF, DAS-6)."),
        _field("gpu", pa.string(), "GPU name as in the Kavier GPU library (e.g. A10)."),
        _field("engine", pa.string(), "Serving engine (e.g. vLLM)."),
        _field("engine_version", pa.string(), "Engine version string (e.g. 0.9.0)."),
        _field("model", pa.string(), "Model name as in the Kavier LLM library (e.g. Llama-3-8B)."),
        _field("sweep", pa.string(), "Which sweep the request belongs to: prefill or decode."),
        _field("n_input_tokens", pa.int32(), "Prompt (prefill) tokens of the request."),
        _field("n_input_tokens_estimated", pa.bool_(), "True when n_input_tokens was not "
               "counted by the server's tokenizer but estimated (see the dataset card)."),
        _field("n_output_tokens", pa.int32(), "Tokens actually generated, first token included."),
        _field("n_output_tokens_requested", pa.int32(), "Output length the client asked for."),
        _field("repetition", pa.int32(), "0-based repetition index within (sweep, size)."),
        _field("latency_s", pa.float64(), "End-to-end latency seen by the client, seconds; "
               "null when the request failed (see error).", nullable=True),
        _field("ttft_s", pa.float64(), "Time to first token, seconds; null if not measured.",
               nullable=True),
        _field("decode_s", pa.float64(), "Time from first to last token, seconds; null if not "
               "measured.", nullable=True),
        _field("throughput_tok_s", pa.float64(), "Throughput as recorded by the tracer, "
               "tokens per second.", nullable=True),
        _field("tpot_s", pa.float64(), "Time per output token after the first, "
               "(latency − TTFT) / (n_output_tokens − 1), seconds; null if not measured.",
               nullable=True),
        _field("itl_mean_s", pa.float64(), "Mean inter-token latency, seconds.", nullable=True),
        _field("itl_p50_s", pa.float64(), "Median inter-token latency, seconds.", nullable=True),
        _field("itl_p99_s", pa.float64(), "99th-percentile inter-token latency, seconds.",
               nullable=True),
        _field("engine_prefill_s", pa.float64(), "The engine's own prefill time of the "
               "request (delta of vllm:request_prefill_time_seconds_sum), seconds.",
               nullable=True),
        _field("engine_decode_s", pa.float64(), "The engine's own decode time (delta of "
               "vllm:request_decode_time_seconds_sum), seconds.", nullable=True),
        _field("prefix_cache_hits", pa.float64(), "Delta of vllm:prefix_cache_hits_total over "
               "the request (tokens served from the prefix cache).", nullable=True),
        _field("concurrency", pa.int32(), "Requests in flight together when this one was "
               "sent (1: a sequential sweep); null in traces that do not say.", nullable=True),
        _field("run_id", pa.string(), "Identifier of the tracing run (links GPU samples).",
               nullable=True),
        _field("error", pa.string(), "Why the request failed; null when it succeeded.",
               nullable=True),
    ],
    metadata={"schema": "kavier-archive/measurements", "version": SCHEMA_VERSION},
)
"""Measurements: one row per traced request."""

WORKLOAD = pa.schema(
    [
        _field("arrival_s", pa.float64(), "Arrival time in seconds from the trace's time zero "
               "(relative timestamps are kept; absolute ones count from the first request); "
               "null when the trace has no timestamps.", nullable=True),
        _field("session_id", pa.string(), "Conversation or user the request belongs to; null "
               "when the trace has no sessions.", nullable=True),
        _field("turn_id", pa.int32(), "0-based turn within the session; null without sessions.",
               nullable=True),
        _field("n_input_tokens", pa.int64(), "Prompt (prefill) tokens."),
        _field("n_output_tokens", pa.int64(), "Generated (decode) tokens."),
        _field("input_tokens", pa.list_(pa.int32()), "The prompt's token ids, when the trace "
               "has them (prefix caching).", nullable=True),
        _field("hash_ids", pa.list_(pa.int64()), "Prefix-block hashes of the prompt, one per "
               "block of hash_block_size tokens (schema metadata), each naming the block and "
               "everything before it.", nullable=True),
    ],
    metadata={"schema": "kavier-archive/workload", "version": SCHEMA_VERSION},
)
"""Workloads: one row per request to simulate. Content columns may be absent."""

GPU_SAMPLES = pa.schema(
    [
        _field("run_id", pa.string(), "Tracing run the sample belongs to (see measurements)."),
        _field("timestamp", pa.timestamp("ms"), "Sample time as nvidia-smi printed it (the "
               "GPU node's local time)."),
        _field("gpu_index", pa.int32(), "GPU index on the node.", nullable=True),
        _field("utilization_gpu_pct", pa.float64(), "utilization.gpu, % of time a kernel ran."),
        _field("utilization_memory_pct", pa.float64(), "utilization.memory, %.", nullable=True),
        _field("power_w", pa.float64(), "power.draw.instant where the driver has it, else "
               "power.draw (a one-second average on Ampere and newer), W."),
        _field("power_field", pa.string(), "Which nvidia-smi field power_w came from."),
        _field("memory_used_mib", pa.float64(), "memory.used, MiB.", nullable=True),
        _field("clock_sm_mhz", pa.float64(), "clocks.sm, MHz.", nullable=True),
        _field("temperature_c", pa.float64(), "temperature.gpu, °C.", nullable=True),
        _field("request_id", pa.int64(), "Request in flight when sampled; null between "
               "requests.", nullable=True),
    ],
    metadata={"schema": "kavier-archive/gpu-samples", "version": SCHEMA_VERSION},
)
"""GPU samples taken by the tracer's nvidia-smi sampler, linked to measurements by run_id."""

CARBON = pa.schema(
    [
        _field("timestamp", pa.timestamp("ms"), "Start of the step (UTC, as OpenDC reads it)."),
        _field("carbon_intensity", pa.float64(), "Grid carbon intensity, gCO2 per kWh, from "
               "this timestamp until the next."),
    ],
    metadata={"schema": "kavier-archive/carbon", "version": SCHEMA_VERSION},
)
"""Carbon-intensity traces, OpenDC's carbon-trace columns."""

SERVING = pa.schema(
    [
        _field("request_id", pa.string(), "The client's or engine's request id."),
        _field("arrival_s", pa.float64(), "When the request reached the point the latencies "
               "are measured from (the engine's queue, or the client's send; dataset.json "
               "timestamps), s from the run's first arrival."),
        _field("n_input_tokens", pa.int64(), "Prompt tokens (the server's tokenizer)."),
        _field("n_output_tokens", pa.int64(), "Tokens generated, the first included."),
        _field("scheduled_s", pa.float64(), "When the engine first scheduled the request, s "
               "from the run's first arrival; null when not recorded.", nullable=True),
        _field("first_token_s", pa.float64(), "When the first output token came out, s; null "
               "when the request failed.", nullable=True),
        _field("last_token_s", pa.float64(), "When the last output token came out, s; null "
               "when the request failed.", nullable=True),
        _field("ttft_s", pa.float64(), "Time to first token, first_token_s − arrival_s.",
               nullable=True),
        _field("tpot_s", pa.float64(), "Time per output token after the first, (last_token_s "
               "− first_token_s) / (n_output_tokens − 1); null for one output token.",
               nullable=True),
        _field("e2e_s", pa.float64(), "End-to-end latency, last_token_s − arrival_s.",
               nullable=True),
        _field("itl_s", pa.list_(pa.float64()), "Inter-token latencies, s, when recorded.",
               nullable=True),
        _field("hash_ids", pa.list_(pa.int64()), "Prefix-block hashes of the prompt, one per "
               "block of hash_block_size tokens, each naming the block and everything before "
               "it (as in workloads); null when the prompt was not recorded.", nullable=True),
        _field("error", pa.string(), "Why the request failed; null when it succeeded.",
               nullable=True),
    ],
    metadata={"schema": "kavier-archive/serving", "version": SCHEMA_VERSION},
)
"""Serving runs: one row per request of a run under load. The engine's configuration is in
``dataset.json`` (``engine``); a once-a-second timeseries may sit beside it."""

SERVING_TIMESERIES = pa.schema(
    [
        _field("t_s", pa.float64(), "End of the sampling interval, s from the run's start."),
        _field("prompt_throughput_tok_s", pa.float64(), "Prompt tokens computed per second.",
               nullable=True),
        _field("generation_throughput_tok_s", pa.float64(), "Tokens generated per second.",
               nullable=True),
        _field("num_requests_running", pa.int64(), "Requests running (vllm:"
               "num_requests_running)."),
        _field("num_requests_waiting", pa.int64(), "Requests waiting (vllm:"
               "num_requests_waiting)."),
        _field("kv_cache_usage_pct", pa.float64(), "KV-cache blocks in use, % of the pool "
               "(vllm:kv_cache_usage_perc × 100).", nullable=True),
    ],
    metadata={"schema": "kavier-archive/serving-timeseries", "version": SCHEMA_VERSION},
)
"""The engine's state once a second during a serving run."""

SCHEMAS = {"measurements": MEASUREMENTS, "workload": WORKLOAD, "gpu_samples": GPU_SAMPLES,
           "carbon": CARBON, "serving": SERVING}
"""Table kinds of the archive, by name."""


def column_docs(schema: pa.Schema) -> dict[str, str]:
    """``{column: doc}`` of a schema, for dataset cards."""
    return {f.name: f.metadata[b"doc"].decode() for f in schema}
