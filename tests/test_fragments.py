import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kavier.fragments import (
    _mean_utilization,
    fragment_batches,
    kv_tokens_at,
)
from kavier.opendc import FRAGMENTS_SCHEMA, TASKS_SCHEMA, opendc_batches

requests_strategy = st.lists(
    st.tuples(st.one_of(st.just(0.0), st.floats(1e-6, 5.0)),
              st.one_of(st.just(0.0), st.floats(1e-6, 30.0)), st.integers(1, 5000),
              st.integers(0, 4000), st.integers(1, 500)),
    min_size=1, max_size=25)


def make_requests(rows) -> pd.DataFrame:
    prefill = np.array([r[0] for r in rows])
    decode = np.array([r[1] for r in rows])
    n_in = np.array([r[2] for r in rows])
    cached = np.minimum([r[3] for r in rows], n_in)
    start = np.concatenate(([0.0], np.cumsum(prefill + decode)[:-1])) + 3.0
    return pd.DataFrame({
        "id": np.arange(len(rows)), "arrival_s": start, "start_s": start,
        "prefill_s": prefill, "decode_s": decode, "n_input_tokens": n_in,
        "n_cached_tokens": cached, "n_output_tokens": [r[4] for r in rows],
        "kv_cache_peak_bytes": (n_in + np.array([r[4] for r in rows])) * 8})


def table(requests: pd.DataFrame) -> pa.Table:
    """The requests as the engine yields them: an Arrow table."""
    return pa.Table.from_pandas(requests, preserve_index=False)


def frame(requests, rate, kv=8.0, cap=0.9, max_rows=7):
    return pa.Table.from_batches(list(fragment_batches(table(requests), rate, kv, cap,
                                                       max_rows))).to_pandas()


@settings(max_examples=60, deadline=None)
@given(requests_strategy, st.sampled_from([0.0, 0.01, 0.1, 0.37, 1.0]),
       st.integers(1, 50))
def test_fragments_cover_each_request_exactly(rows, rate, max_rows):
    r = make_requests(rows)
    f = frame(r, rate, max_rows=max_rows)
    total = (r["prefill_s"] + r["decode_s"]).to_numpy()
    per_request = f.groupby("request_id")["duration_s"].sum().reindex(r["id"], fill_value=0)
    assert np.allclose(per_request.to_numpy(), total, atol=1e-9)
    assert (f["duration_s"] > 0).all()
    assert f["gpu_utilization"].between(0.5 - 1e-12, 0.9 + 1e-12).all()
    if rate > 0:
        assert (f["duration_s"] <= rate * (1 + 1e-6)).all()
    # rows start where the previous one ended
    ends = (f["time_s"] + f["duration_s"]).groupby(f["request_id"]).max().to_numpy()
    assert np.allclose(ends, (r["start_s"] + total)[total > 0], atol=1e-6)
    # the flush size never changes the rows
    assert f.equals(frame(r, rate, max_rows=10_000))


@settings(max_examples=40, deadline=None)
@given(requests_strategy, st.sampled_from([0.01, 0.1, 0.37, 1.0]))
def test_fast_columns_equal_the_direct_formulas(rows, rate):
    r = make_requests(rows)
    f = frame(r, rate)
    if f.empty:
        return
    by_id = r.set_index("id").loc[f["request_id"]]
    offset = f["time_s"].to_numpy() - by_id["start_s"].to_numpy()
    end = offset + f["duration_s"].to_numpy()
    total = (by_id["prefill_s"] + by_id["decode_s"]).to_numpy()
    util = _mean_utilization(offset, end, total, 0.9, 0.1, 0.1)
    assert np.allclose(f["gpu_utilization"], util, atol=1e-9)
    tokens = kv_tokens_at(end, *(by_id[c].to_numpy() for c in (
        "prefill_s", "decode_s", "n_input_tokens", "n_cached_tokens", "n_output_tokens")))
    last = f["request_id"].ne(f["request_id"].shift(-1)).to_numpy()
    kv = f["kv_cache_bytes"].to_numpy() / 8
    assert (np.abs(kv - tokens)[~last] <= 1.0 + 1e-6).all()
    end_state = (by_id["n_input_tokens"] + by_id["n_output_tokens"]).to_numpy()
    assert (kv[last] == end_state[last]).all()


@settings(max_examples=40, deadline=None)
@given(requests_strategy)
def test_utilization_seconds_do_not_depend_on_the_export_rate(rows):
    r = make_requests(rows)
    totals = [(lambda f: (f["gpu_utilization"] * f["duration_s"]).sum())(frame(r, rate))
              for rate in (0.0, 0.01, 0.1, 1.0)]
    assert np.allclose(totals, totals[0], rtol=1e-9, atol=1e-9)


def test_kv_grows_to_the_whole_sequence():
    r = make_requests([(1.0, 4.0, 1000, 200, 100)])
    f = frame(r, 0.1)
    assert f["kv_cache_bytes"].is_monotonic_increasing
    assert f["kv_cache_bytes"].iloc[-1] == 8 * 1100
    assert f["kv_cache_bytes"].iloc[0] >= 8 * 200     # the reused prefix is there from t = 0
    assert (frame(r, 0.1, kv=0.0)["kv_cache_bytes"] == 0).all()


def test_bad_arguments():
    r = make_requests([(1.0, 1.0, 10, 0, 5)])
    for args in ((-1.0, 8.0), (0.1, 8.0, 0.0), (0.1, 8.0, 1.0, 0)):
        with pytest.raises(ValueError):
            list(fragment_batches(table(r), *args))


def test_opendc_schema_and_milliseconds(tmp_path):
    # 1.9996 s must become 2000 ms, not int(seconds) * 1000
    r = make_requests([(0.4996, 1.5, 100, 0, 10), (0.0, 0.0, 100, 100, 10),
                       (0.0004, 0.0, 10, 0, 1)])
    tasks, fragments = opendc_batches(table(r), gpu_mhz=1695.0, weight_bytes=2048.0,
                                      utilization_cap=0.9)
    for batch, schema, name in ((tasks, TASKS_SCHEMA, "tasks"),
                                (fragments, FRAGMENTS_SCHEMA, "fragments")):
        pq.write_table(pa.Table.from_batches([batch]), tmp_path / f"{name}.parquet")
        assert pq.read_schema(tmp_path / f"{name}.parquet").equals(schema)
    t = tasks.to_pandas()
    f = fragments.to_pandas()
    assert t["id"].tolist() == [0]               # no GPU work (or under 1 ms): no task
    assert t["duration"].tolist() == [2000]
    assert f.groupby("id")["duration"].sum().tolist() == [2000]
    assert f["gpu_usage"].tolist() == pytest.approx([0.5 * 1695, 0.9 * 1695, 0.5 * 1695])
    assert t["submission_time"].iloc[0] == pd.Timestamp("2022-01-01T00:00:03Z")
    assert t["mem_capacity"].iloc[0] == int(np.ceil((2048 + 110 * 8) / 1024))
    assert str(TASKS_SCHEMA.field("submission_time").type) == "timestamp[ms, tz=UTC]"
    assert [TASKS_SCHEMA.field(c).type for c in ("id", "duration", "gpu_count")] == [
        pa.int32(), pa.int64(), pa.int32()]


@settings(max_examples=40, deadline=None)
@given(requests_strategy)
def test_opendc_fragments_add_up_to_tasks(rows):
    r = make_requests(rows)
    tasks, fragments = opendc_batches(table(r), 1000.0, 0.0)
    t, f = tasks.to_pandas(), fragments.to_pandas()
    assert (f["duration"] > 0).all()
    assert f.groupby("id")["duration"].sum().to_dict() == dict(zip(t["id"], t["duration"],
                                                                   strict=True))
    total_ms = (r["prefill_s"] + r["decode_s"]).to_numpy() * 1000
    assert np.all(np.abs(t["duration"].to_numpy() - total_ms[t["id"]]) <= 1.0)
