"""numpy ⇄ Arrow conversions without pandas (:mod:`archive.arrow`)."""

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from archive.arrow import from_numpy, table, to_numpy

DTYPES = [np.int8, np.int32, np.int64, np.uint16, np.float32, np.float64, np.bool_]


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_round_trip_equals_pyarrows_own_conversion(dtype, data):
    values = np.asarray(data.draw(st.lists(st.integers(0, 100), max_size=50)), dtype=dtype)
    ours = from_numpy(values)
    assert ours.equals(pa.array(values))
    assert ours.validate(full=True) is None
    back = to_numpy(ours)
    assert back.dtype == values.dtype and np.array_equal(back, values)


def test_slices_chunks_and_types():
    chunked = pa.chunked_array([pa.array([1, 2, 3], pa.int64()), pa.array([4, 5], pa.int64())])
    assert to_numpy(chunked).tolist() == [1, 2, 3, 4, 5]
    assert to_numpy(chunked.slice(2, 2)).tolist() == [3, 4]          # offset into a chunk
    assert to_numpy(pa.array([1.5, 2.5]).slice(1), np.int64).tolist() == [2]
    assert to_numpy(pa.chunked_array([], pa.float64())).size == 0
    stamps = from_numpy(np.array([0, 1500], np.int64), pa.timestamp("ms", tz="UTC"))
    assert stamps.type == pa.timestamp("ms", tz="UTC") and stamps[1].value == 1500
    nan = from_numpy(np.array([np.nan, 1.0]))
    assert nan.null_count == 0 and np.isnan(to_numpy(nan)[0])        # as pa.array leaves NaN


def test_nulls_and_text_fall_back_to_pyarrow():
    assert np.isnan(to_numpy(pa.array([1, None, 3]))[1])
    assert to_numpy(pa.array(["a", None])).tolist() == ["a", None]
    assert from_numpy(np.array(["x", "y"], object)).type == pa.string()


def test_table_mixes_numpy_and_arrow_columns():
    t = table({"a": np.arange(3), "s": pa.chunked_array([["x", "y", "z"]]),
               "b": np.array([True, False, True])})
    assert t.column_names == ["a", "s", "b"]
    assert t.column("b").to_pylist() == [True, False, True]


def test_none_of_this_imports_pandas(tmp_path):
    script = """
import sys, numpy as np, pyarrow as pa, pyarrow.parquet as pq
from archive.arrow import from_numpy, table, to_numpy
t = table({"a": np.arange(5), "b": np.ones(5) > 0})
pq.write_table(t, sys.argv[1])
back = pq.ParquetFile(sys.argv[1]).read()
assert to_numpy(back.column("a")).sum() == 10
print("pandas" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "t.parquet")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
