"""Streaming against a real loopback server (tests/fake_vllm.py) whose timings are known: both
ways of ending an SSE body, in-stream errors, a missing usage event, retried overload answers
with Retry-After, and a server that dies mid-stream."""

import numpy as np
import pytest
from fake_vllm import FakeState, FakeTiming, start

from tracer.client import VLLMClient

MODEL = "Llama-3-8B"


@pytest.fixture()
def slow():
    """A server with a 200 ms prefill and 50 ms per further token."""
    state = FakeState(model=MODEL, timing=FakeTiming(0.2, 0.0, 0.05))
    srv, url = start(state)
    yield state, url
    srv.shutdown()


@pytest.mark.parametrize("close_delimited", [False, True], ids=["chunked", "close-delimited"])
def test_ttft_and_itl_within_ten_percent_for_both_transfer_styles(slow, close_delimited):
    state, url = slow
    state.close_delimited = close_delimited
    result = VLLMClient(url).complete(MODEL, [1] * 8, 10)
    assert result.success, result.error
    # read as the bytes arrive: TTFT is the prefill, not the whole stream (0.65 s)
    assert result.ttft_s == pytest.approx(0.2, rel=0.10)
    assert np.mean(result.itl_s) == pytest.approx(0.05, rel=0.10)
    assert len(result.itl_s) == 9 and result.n_output_tokens == 10
    assert result.tpot_s == pytest.approx(0.05, rel=0.10)


@pytest.mark.parametrize("mode,message", [
    ("error_after", "server error in the stream: engine died"),
    ("omit_usage", "no usage in the stream"),
    ("die_after", "connection lost"),
])
def test_broken_streams_are_failed_results_with_the_reason(slow, mode, message):
    state, url = slow
    setattr(state, mode, 3 if mode != "omit_usage" else True)
    result = VLLMClient(url, timeout_s=5).complete(MODEL, [1] * 8, 6)
    assert not result.success and message in result.error, result.error
    assert result.ttft_s == pytest.approx(0.2, rel=0.10)       # what was measured is kept


def test_overload_is_retried_after_the_servers_retry_after(slow):
    state, url = slow
    state.statuses = [(503, {"Retry-After": "1"})]
    result = VLLMClient(url, retries=2).complete(MODEL, [1] * 8, 4)
    assert result.success, result.error
    assert len(state.attempts) == 2 and state.attempts[1] - state.attempts[0] >= 0.95
    # retries run out: the server's answer and its message, one line
    state.attempts.clear()
    state.statuses = [(503, {})] * 4 + [(429, {})]
    result = VLLMClient(url, retries=1).complete(MODEL, [1] * 8, 4)
    assert not result.success and len(state.attempts) == 2
    assert result.error == "POST /v1/completions answered HTTP 503: overloaded"
