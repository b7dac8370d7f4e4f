import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from kavier.engine import simulate, start_times
from kavier.timing import ThesisTiming


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 100), st.floats(0.01, 10)), min_size=1, max_size=40))
def test_start_times_equal_the_fifo_recursion(pairs):
    arrivals = np.sort(np.array([a for a, _ in pairs]))
    service = np.array([s for _, s in pairs])
    free, expected = 0.0, []
    for a, s in zip(arrivals, service, strict=True):
        start = max(a, free)
        expected.append(start)
        free = start + s
    assert np.allclose(start_times(arrivals, service), expected)


def test_back_to_back_and_with_arrivals(llama8b, a10):
    timing = ThesisTiming(llama8b, a10)
    w = pd.DataFrame({"arrival_s": [0.0, 0.0, 100.0], "n_input_tokens": [100, 200, 300],
                      "n_output_tokens": [10, 20, 30]})
    timed = simulate(w, timing)
    service = timed["prefill_s"] + timed["decode_s"]
    assert timed["queue_s"].iloc[0] == 0 and np.isclose(timed["queue_s"].iloc[1], service[0])
    assert timed["queue_s"].iloc[2] == 0 and timed["start_s"].iloc[2] == 100.0
    assert np.allclose(timed["ttft_s"], timed["queue_s"] + timed["prefill_s"])
    batch = simulate(w, timing, honor_arrivals=False)
    assert (batch["queue_s"] == 0).all()
    assert np.allclose(batch["start_s"].iloc[1:], np.cumsum(service)[:-1])
