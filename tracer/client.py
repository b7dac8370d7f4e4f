"""Client for a vLLM OpenAI-compatible server: one request function that returns a result
record (vLLM's benchmark habit), exact-length prompts, and the engine's own metrics.

Definitions (as ``vllm bench serve`` computes them):

* **TTFT**: from sending the request to the first SSE event that carries a choice;
* **ITL**: the gaps between consecutive such events;
* **E2E latency**: from sending to the end of the stream;
* **decode time**: E2E − TTFT; **TPOT** = (E2E − TTFT) / (n_out − 1), with ``n_out`` from the
  server's ``usage`` (``stream_options.include_usage``), not from counting events (one event
  can carry several tokens).

Other tools differ: genai-perf also reports TTFT at the first response but skips empty first
chunks and computes ITL per token from its own tokenizer; guidellm measures time to first token
at the first *non-empty* text and TPOT over all output tokens including the first. Our numbers
are comparable with vLLM's own benchmark.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np
import requests
import urllib3
from prometheus_client.parser import text_string_to_metric_families
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

from archive.errors import InputError

LOREM = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
         "incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud "
         "exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat. Duis aute irure "
         "dolor in reprehenderit in voluptate velit esse cillum dolore eu fugiat nulla pariatur.")
INSTRUCTION = "What is the most common word in the following text? "
ENGINE_METRICS = {"prefill": "vllm:request_prefill_time_seconds",
                  "decode": "vllm:request_decode_time_seconds",
                  "prefix_cache_hits": "vllm:prefix_cache_hits"}
"""vLLM's Prometheus series whose sums the tracer differences around each request."""


class ServerError(RuntimeError):
    """The server could not be reached or refused a call; the message never holds the key."""


@dataclass
class RequestResult:
    """One streamed request, as measured by the client (times in seconds)."""

    success: bool
    ttft_s: float | None = None
    latency_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    n_input_tokens: int | None = None
    n_output_tokens: int | None = None
    error: str | None = None
    text: str = ""
    """The generated text (a multi-turn session appends it to the next turn's prompt)."""

    @property
    def decode_s(self) -> float | None:
        """E2E − TTFT."""
        return None if not self.success else self.latency_s - self.ttft_s

    @property
    def tpot_s(self) -> float | None:
        """(E2E − TTFT) / (n_out − 1); None for one output token."""
        if not self.success or not self.n_output_tokens or self.n_output_tokens < 2:
            return None
        return self.decode_s / (self.n_output_tokens - 1)

    def itl_stats(self) -> dict:
        """Mean, median and 99th percentile of the inter-token latencies."""
        if not self.itl_s:
            return {"itl_mean_s": None, "itl_p50_s": None, "itl_p99_s": None}
        itl = np.asarray(self.itl_s)
        return {"itl_mean_s": float(itl.mean()), "itl_p50_s": float(np.percentile(itl, 50)),
                "itl_p99_s": float(np.percentile(itl, 99))}


def _split_url(url: str) -> tuple[str, tuple[str, str] | None]:
    """``url`` without credentials (what requests go to and errors may show), and the
    ``user:password`` it carried (sent as HTTP basic auth, never shown).

    Raises
    ------
    InputError
        For a URL without an http(s) scheme or host, or with a query string (which could
        carry a key into logs: use ``--api-key-env`` or ``--api-key-file``).
    """
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError("expected a URL like http://node:8000 (with http:// or https://)",
                         field="url")
    if parts.query or parts.fragment:
        raise InputError("the URL must not carry a query string; pass keys with --api-key-env "
                         "or --api-key-file", field="url")
    try:
        port = parts.port
    except ValueError:
        raise InputError("the URL's port is not a number", field="url") from None
    host = parts.hostname + (f":{port}" if port else "")
    clean = urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))
    credentials = ((unquote(parts.username or ""), unquote(parts.password or ""))
                   if parts.username or parts.password else None)
    return clean, credentials


RETRY_STATUSES = (429, 502, 503, 504)
"""Answers retried (with ``Retry-After`` honoured): overload and gateway errors, which a
restarting or saturated server gives and a later attempt can pass."""


def _error_text(response: requests.Response) -> str:
    """The server's own error message from a JSON error body (vLLM:
    ``{"error": {"message": ...}}`` or ``{"message": ...}``), cut to 200 characters; ""
    when there is none."""
    try:
        body = response.json()
    except ValueError:
        return ""
    error = body.get("error", body) if isinstance(body, dict) else body
    message = error.get("message", error) if isinstance(error, dict) else error
    return str(message)[:200] if message else ""


class VLLMClient:
    """Talks to one vLLM server.

    Parameters
    ----------
    base_url : str
        e.g. ``http://node:8000``.
    api_key : str or None
        Sent as a bearer token; never logged or put into errors.
    timeout_s : float
        Per-request limit: connect, each wait for the next stream bytes, and the whole
        stream.
    retries : int
        Attempts after the first for connection errors and :data:`RETRY_STATUSES`, by
        urllib3's :class:`~urllib3.util.Retry`: exponential backoff (0.5, 1, 2 s …) or the
        server's ``Retry-After``, whichever it gives.
    """

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 600.0,
                 retries: int = 3) -> None:
        self.base_url, credentials = _split_url(base_url)
        self.timeout_s, self.retries = timeout_s, retries
        self._lorem: dict[str, list[int]] = {}
        self.session = requests.Session()
        retry = Retry(total=retries, connect=retries, read=0, status=retries,
                      backoff_factor=0.5, status_forcelist=RETRY_STATUSES,
                      allowed_methods=None, respect_retry_after_header=True,
                      raise_on_status=False)
        for scheme in ("http://", "https://"):
            self.session.mount(scheme, HTTPAdapter(max_retries=retry))
        if credentials:
            self.session.auth = credentials
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def _call(self, method: str, path: str, **kwargs) -> requests.Response:
        try:
            response = self.session.request(method, self.base_url + path,
                                            timeout=self.timeout_s, **kwargs)
        except requests.ConnectionError as exc:
            raise ServerError(f"cannot reach {self.base_url}: {type(exc).__name__}") from None
        if response.status_code >= 400:
            detail = _error_text(response)
            response.close()
            raise ServerError(f"{method} {path} answered HTTP {response.status_code}"
                              + (f": {detail}" if detail else ""))
        return response

    def models(self) -> list[dict]:
        """``/v1/models``: the served models."""
        return self._call("GET", "/v1/models").json()["data"]

    def max_model_len(self, model: str, models: list[dict] | None = None) -> int | None:
        """The served model's ``max_model_len`` from ``/v1/models`` (or from its answer
        ``models``, already fetched); None when not said."""
        return next((m.get("max_model_len") for m in models or self.models()
                     if m.get("id") == model), None)

    def version(self) -> str:
        """The engine's version from ``/version`` ("" when the server does not say)."""
        try:
            return str(self._call("GET", "/version").json().get("version", ""))
        except (ServerError, ValueError):
            return ""

    def cache_config(self) -> dict:
        """The KV cache settings vLLM reports in ``/metrics`` (the labels of its
        ``vllm:cache_config_info`` info gauge, ``vllm/v1/metrics/loggers.py``):
        ``block_size``, ``num_gpu_blocks`` and ``enable_prefix_caching`` where published, as
        numbers and booleans; {} from a server without them."""
        try:
            text = self._call("GET", "/metrics").text
        except ServerError:
            return {}
        for family in text_string_to_metric_families(text):
            if family.name == "vllm:cache_config_info" and family.samples:
                labels = family.samples[0].labels
                out = {}
                for key in ("block_size", "num_gpu_blocks"):
                    if labels.get(key, "").isdigit():
                        out[key] = int(labels[key])
                if labels.get("enable_prefix_caching") in ("True", "False"):
                    out["enable_prefix_caching"] = labels["enable_prefix_caching"] == "True"
                return out
        return {}

    def tokenize(self, model: str, text: str) -> list[int]:
        """Token ids of ``text`` by the server's tokenizer (``/tokenize``)."""
        return self._call("POST", "/tokenize", json={"model": model, "prompt": text,
                                                     "add_special_tokens": False}
                          ).json()["tokens"]

    def prompt_tokens(self, model: str, n_tokens: int, head_text: str = INSTRUCTION
                      ) -> list[int]:
        """A prompt of exactly ``n_tokens`` token ids: ``head_text`` (by default the "most
        common word" question) over lorem-ipsum text, repeated and cut to length. Sent as
        token ids, so the count is exact whatever the tokenizer does at word boundaries."""
        head = self.tokenize(model, head_text)
        if model not in self._lorem:
            self._lorem[model] = self.tokenize(model, LOREM + " ")
        body = self._lorem[model]
        ids = head + body * (max(n_tokens - len(head), 0) // max(len(body), 1) + 1)
        return ids[:n_tokens]

    def metrics(self) -> dict[str, float]:
        """Sums of :data:`ENGINE_METRICS` from ``/metrics`` (missing series are absent)."""
        text = self._call("GET", "/metrics").text
        wanted = {v: k for k, v in ENGINE_METRICS.items()}
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            name = wanted.get(family.name)
            for sample in family.samples:
                if name and sample.name in (f"{family.name}_sum", f"{family.name}_total",
                                            family.name):
                    out[name] = out.get(name, 0.0) + sample.value
                if name == "prefill" and sample.name == f"{family.name}_count":
                    out["finished"] = out.get("finished", 0.0) + sample.value
        return out

    def metrics_after(self, before: dict[str, float], wait_s: float = 1.0) -> dict[str, float]:
        """``/metrics`` once the engine has counted one more finished request than in
        ``before`` (it may record a request just after its stream ends), polling for up to
        ``wait_s``; the last scrape if it never does."""
        deadline = time.monotonic() + wait_s
        while True:
            now = self.metrics()
            if now.get("finished", 0.0) > before.get("finished", 0.0) or (
                    time.monotonic() > deadline):
                return now
            time.sleep(0.01)

    def complete(self, model: str, prompt: list[int] | str, n_output_tokens: int,
                 cache_salt: str | None = None, temperature: float = 0.0) -> RequestResult:
        """Stream one completion of exactly ``n_output_tokens`` tokens (``max_tokens`` =
        ``min_tokens``, ``ignore_eos``) and measure it. Failures come back as a result with
        ``success=False`` and the error, never as an exception."""
        payload = {"model": model, "prompt": prompt, "max_tokens": n_output_tokens,
                   "min_tokens": n_output_tokens, "ignore_eos": True, "stream": True,
                   "stream_options": {"include_usage": True}, "temperature": temperature}
        if cache_salt:
            payload["cache_salt"] = cache_salt
        start = time.perf_counter()
        try:
            response = self._call("POST", "/v1/completions", json=payload, stream=True)
            return self._read_stream(response, start)
        except (ServerError, requests.RequestException, ValueError,
                urllib3.exceptions.HTTPError) as exc:
            message = str(exc) if isinstance(exc, ServerError) else (
                f"{type(exc).__name__} (connection lost or bad stream)")
            return RequestResult(False, error=message)

    def _read_stream(self, response: requests.Response, start: float) -> RequestResult:
        """Parse the SSE stream as its bytes arrive (chunked or close-delimited), timing each
        event that carries a choice. An in-stream ``{"error": ...}`` event, a connection lost
        mid-stream, a stream cut off before ``data: [DONE]``, one without ``usage``, and one
        past ``timeout_s`` are failed results that keep what was measured up to then."""
        result = RequestResult(True)
        with response:
            try:
                done = self._events(response, result, start)
            except StreamLost as exc:
                events = len(result.itl_s) + (result.ttft_s is not None)
                return _failed(result, f"connection lost mid-stream after {events} token "
                                       f"events ({exc})")
        result.latency_s = time.perf_counter() - start
        if result.error:
            return result
        if result.ttft_s is None:
            return _failed(result, "stream ended without a token")
        if not done:
            return _failed(result, f"stream cut off after {len(result.itl_s) + 1} token events")
        if result.n_output_tokens is None:
            return _failed(result, "no usage in the stream (the server ignored "
                                   "stream_options.include_usage)")
        return result

    def _events(self, response: requests.Response, result: RequestResult,
                start: float) -> bool:
        """Read the events into ``result``, failing it on an in-stream error or past
        ``timeout_s``; returns whether ``data: [DONE]`` came."""
        last = None
        deadline = start + self.timeout_s
        for line in _sse_lines(response):
            now = time.perf_counter()
            if now > deadline:
                _failed(result, f"timed out after {self.timeout_s:g} s")
                return False
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return True
            event = json.loads(data)
            if event.get("error"):
                error = event["error"]
                message = error.get("message", error) if isinstance(error, dict) else error
                _failed(result, f"server error in the stream: {str(message)[:200]}")
                return False
            if event.get("choices"):
                result.text += event["choices"][0].get("text") or ""
                if result.ttft_s is None:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                last = now
            if event.get("usage"):
                result.n_input_tokens = event["usage"].get("prompt_tokens")
                result.n_output_tokens = event["usage"].get("completion_tokens")
        return False


def _failed(result: RequestResult, error: str) -> RequestResult:
    """``result`` marked failed with ``error``, keeping what was measured."""
    result.success, result.error = False, error
    return result


class StreamLost(Exception):
    """The connection broke mid-stream (the server died, a proxy cut it)."""


def _sse_lines(response: requests.Response):
    """The body's lines as bytes arrive: ``read1`` returns whatever the socket has (up to
    64 KiB) instead of waiting for a full buffer, or for the end of a body the server ends by
    closing the connection (``iter_lines(chunk_size=None)`` reads such a body whole before
    yielding a line, so TTFT would include the whole decode)."""
    pending = b""
    while True:
        try:
            data = response.raw.read1(65536)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StreamLost(type(exc).__name__) from None
        if not data:
            break
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r")
    if pending:
        yield pending
