"""A real HTTP server on loopback that speaks the subset of vLLM's OpenAI-compatible API the
tracer uses: ``/v1/models``, ``/v1/completions`` (streaming SSE with usage), ``/tokenize``,
``/metrics`` (Prometheus text) and ``/health``.

Its timing is a model, not a GPU: prefill takes ``prefill_s + prefill_per_token_s · n`` and each
further token ``decode_per_token_s``, so tests know the truth the tracer should measure.
Tokens are whitespace-separated words mapped to integer ids (or a list of ids as the prompt).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class FakeTiming:
    prefill_s: float = 0.004
    prefill_per_token_s: float = 2e-6
    decode_per_token_s: float = 0.002


@dataclass
class FakeState:
    model: str = "Llama-3-8B"
    timing: FakeTiming = field(default_factory=FakeTiming)
    api_key: str | None = None
    fail_next: int = 0                     # requests to answer with HTTP 500
    statuses: list = field(default_factory=list)   # next answers: (status, headers) each
    close_delimited: bool = False          # end the SSE body by closing the connection
    error_after: int | None = None         # an in-stream {"error": ...} event after k tokens
    omit_usage: bool = False               # no usage event (a server ignoring include_usage)
    die_after: int | None = None           # drop the connection after k tokens
    cache_config: dict | None = None       # labels of vllm:cache_config_info (None: absent)
    attempts: list = field(default_factory=list)   # arrival time of every completion call
    prefill_sum: float = 0.0
    decode_sum: float = 0.0
    requests: int = 0
    salts: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _tokens(prompt) -> list[int]:
    if isinstance(prompt, list):
        return [int(t) for t in prompt]
    return [sum(map(ord, w)) % 50_000 for w in str(prompt).split()]


class _Handler(BaseHTTPRequestHandler):
    state: FakeState
    protocol_version = "HTTP/1.1"          # keep-alive and chunked streams, as uvicorn does

    def log_message(self, *args):           # keep test output clean
        pass

    def setup(self):
        super().setup()
        # send each SSE event at once, as uvicorn does (Nagle + delayed ACKs would hold small
        # writes back by ~40 ms)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _json(self, body: dict, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        if self.state.api_key and self.headers.get("Authorization") != (
                f"Bearer {self.state.api_key}"):
            self._json({"error": "unauthorized"}, 401)
            return False
        return True

    def _body(self) -> dict:
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

    def do_GET(self):
        if self.path == "/health":
            self._json({})
        elif self.path == "/v1/models":
            if self._authorized():
                self._json({"data": [{"id": self.state.model, "object": "model",
                                      "owned_by": "vllm", "max_model_len": 8192}]})
        elif self.path == "/version":
            self._json({"version": "0.0.0-fake"})
        elif self.path == "/metrics":
            s = self.state
            text = (
                "# HELP vllm:request_prefill_time_seconds Histogram of prefill time.\n"
                "# TYPE vllm:request_prefill_time_seconds histogram\n"
                f'vllm:request_prefill_time_seconds_sum{{model_name="{s.model}"}} '
                f"{s.prefill_sum}\n"
                f'vllm:request_prefill_time_seconds_count{{model_name="{s.model}"}} '
                f"{s.requests}\n"
                "# HELP vllm:request_decode_time_seconds Histogram of decode time.\n"
                "# TYPE vllm:request_decode_time_seconds histogram\n"
                f'vllm:request_decode_time_seconds_sum{{model_name="{s.model}"}} '
                f"{s.decode_sum}\n"
                f'vllm:request_decode_time_seconds_count{{model_name="{s.model}"}} '
                f"{s.requests}\n"
                "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in tokens.\n"
                "# TYPE vllm:prefix_cache_hits_total counter\n"
                f'vllm:prefix_cache_hits_total{{model_name="{s.model}"}} 0.0\n')
            if s.cache_config is not None:
                labels = ",".join(f'{k}="{v}"' for k, v in s.cache_config.items())
                text += ("# HELP vllm:cache_config_info Information of the LLMEngine "
                         "CacheConfig\n# TYPE vllm:cache_config_info gauge\n"
                         f"vllm:cache_config_info{{{labels}}} 1.0\n")
            data = text.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self._json({"error": "not found"}, 404)

    def do_POST(self):
        if not self._authorized():
            return
        body = self._body()
        if self.path == "/tokenize":
            tokens = _tokens(body.get("prompt", ""))
            self._json({"tokens": tokens, "count": len(tokens), "max_model_len": 8192})
        elif self.path == "/v1/completions":
            self._complete(body)
        else:
            self._json({"error": "not found"}, 404)

    def _complete(self, body: dict) -> None:
        s = self.state
        with s.lock:
            s.attempts.append(time.monotonic())
            if s.fail_next > 0:
                s.fail_next -= 1
                self._json({"error": "internal error"}, 500)
                return
            if s.statuses:
                status, headers = s.statuses.pop(0)
                data = json.dumps({"error": {"message": "overloaded"}}).encode()
                self.send_response(status)
                for key, value in {"Content-Length": str(len(data)), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)
                return
            s.salts.append(body.get("cache_salt"))
        n_in = len(_tokens(body.get("prompt", "")))
        n_out = int(body.get("max_tokens", 16))
        prefill = s.timing.prefill_s + s.timing.prefill_per_token_s * n_in
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if s.close_delimited:            # HTTP/1.1 without a length: the close ends the body
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        start = time.perf_counter()
        time.sleep(prefill)
        first = time.perf_counter()
        for i in range(n_out):
            if i:
                time.sleep(s.timing.decode_per_token_s)
            if i == s.die_after:         # the server process dies: no terminating chunk
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            if i == s.error_after:
                error = {"error": {"message": "engine died", "type": "InternalServerError",
                                   "code": 500}}
                self._chunk(f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n")
                self._chunk("")
                return
            chunk = {"id": "cmpl-fake", "object": "text_completion", "model": s.model,
                     "choices": [{"index": 0, "text": " tok", "finish_reason": None}]}
            self._chunk(f"data: {json.dumps(chunk)}\n\n")
        end = time.perf_counter()
        with s.lock:       # as vLLM, the engine's counters are updated before the stream ends
            s.prefill_sum += first - start
            s.decode_sum += end - first
            s.requests += 1
        usage = {"id": "cmpl-fake", "choices": [], "usage": {
            "prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}
        if not s.omit_usage:
            self._chunk(f"data: {json.dumps(usage)}\n\n")
        self._chunk("data: [DONE]\n\n")
        self._chunk("")


def _write_chunk(handler: BaseHTTPRequestHandler, text: str) -> None:
    data = text.encode()
    if handler.state.close_delimited:
        if data:
            handler.wfile.write(data)
    else:
        handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    handler.wfile.flush()


_Handler._chunk = _write_chunk


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024             # a listen backlog like uvicorn's (2048), not 5

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):   # a client that hung up
            super().handle_error(request, client_address)


def start(state: FakeState) -> tuple[ThreadingHTTPServer, str]:
    """Start the server on 127.0.0.1 (a free port) in a daemon thread; returns it and its URL."""
    handler = type("Handler", (_Handler,), {"state": state})
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def start_process(timing: FakeTiming) -> tuple[subprocess.Popen, str]:
    """The server in a process of its own (as a real server is: a load test's client then
    does not share its GIL with the server's threads); the caller terminates it."""
    values = (timing.prefill_s, timing.prefill_per_token_s, timing.decode_per_token_s)
    code = ("import sys, time\nsys.path.insert(0, sys.argv[1])\n"
            "from fake_vllm import FakeState, FakeTiming, start\n"
            f"srv, url = start(FakeState(timing=FakeTiming{values}))\n"
            "print(url, flush=True)\ntime.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent)],
                               stdout=subprocess.PIPE, text=True)
    return process, process.stdout.readline().strip()
