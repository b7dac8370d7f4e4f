"""Versioned schemas of the LLM Trace Archive's tables (pyarrow), with a docstring per column.

Units live in column names (``_s`` seconds, ``_tok_s`` tokens per second). Simulators and
calibration never parse files themselves: they read through :mod:`archive` (OpenDC's habit of
keeping the trace format in its own module).
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1.0"


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
        _field("latency_s", pa.float64(), "End-to-end latency seen by the client, seconds."),
        _field("ttft_s", pa.float64(), "Time to first token, seconds; null if not measured.",
               nullable=True),
        _field("decode_s", pa.float64(), "Time from first to last token, seconds; null if not "
               "measured.", nullable=True),
        _field("throughput_tok_s", pa.float64(), "Throughput as recorded by the tracer, "
               "tokens per second.", nullable=True),
    ],
    metadata={"schema": "kavier-archive/measurements", "version": SCHEMA_VERSION},
)
"""Measurements: one row per traced request."""

WORKLOAD = pa.schema(
    [
        _field("arrival_s", pa.float64(), "Arrival time relative to the first request, seconds; "
               "null when the trace has no timestamps.", nullable=True),
        _field("n_input_tokens", pa.int64(), "Prompt (prefill) tokens."),
        _field("n_output_tokens", pa.int64(), "Generated (decode) tokens."),
    ],
    metadata={"schema": "kavier-archive/workload", "version": SCHEMA_VERSION},
)
"""Workloads: one row per request to simulate."""


def column_docs(schema: pa.Schema) -> dict[str, str]:
    """``{column: doc}`` of a schema, for dataset cards."""
    return {f.name: f.metadata[b"doc"].decode() for f in schema}
