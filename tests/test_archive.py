import pandas as pd
import pyarrow.parquet as pq
import pytest

import archive
from archive.datasets import dataset_dir
from archive.errors import InputError
from archive.importers.a10_surf import convert, to_table
from archive.schema import MEASUREMENTS
from archive.traces import read_trace, read_workload
from calibrate.fit import size_medians

A10 = "a10-surf-vllm-llama3-8b"


def test_datasets_are_listed_and_loaded():
    assert {A10, "azure-llm-inference-2023-conv"} <= set(archive.list_datasets())
    df = archive.load(A10)
    assert list(df.columns) == MEASUREMENTS.names
    assert (df["sweep"].value_counts().to_dict()) == {"decode": 110, "prefill": 90}
    assert (df["model"] == "Llama-3-8B").all() and (df["engine_version"] == "0.9.0").all()


def test_bundled_table_is_exactly_the_conversion_of_the_raw_files(tmp_path):
    folder = dataset_dir(A10)
    rebuilt = to_table(convert(folder / "raw_prefill.csv", folder / "raw_decode.csv"))
    assert rebuilt.equals(pq.read_table(folder / "measurements.parquet"))


def test_medians_reproduce_tables_6_5_and_6_6():
    med = size_medians(archive.load(A10))
    folder = dataset_dir(A10)
    prefill = pd.read_csv(folder / "filtered_prefill.csv")
    decode = pd.read_csv(folder / "filtered_decode.csv")
    ours = med[med["sweep"] == "prefill"].set_index("size")["median_latency_s"]
    assert ours.loc[prefill["prompt_size"]].to_numpy() == pytest.approx(
        prefill["median_latency_s"].to_numpy(), abs=1e-3)
    ours = med[med["sweep"] == "decode"].set_index("size")
    same = decode["requested_response_size"] != 4096  # the published 4096 row was filtered
    assert ours.loc[decode.loc[same, "requested_response_size"], "median_n_output_tokens"
                    ].to_numpy() == pytest.approx(
        decode.loc[same, "actual_median_response_size"].to_numpy(), abs=0.5)
    assert ours.loc[4096, "median_n_output_tokens"] == 1615.5


def test_azure_trace_reads_with_arrivals():
    w = read_workload("azure-llm-inference-2023-conv")
    assert len(w) == 19366 and w["arrival_s"].iloc[0] == 0.0
    assert w["arrival_s"].max() == pytest.approx(3501.72, abs=0.01)
    assert w["n_input_tokens"].sum() == 22_361_870


@pytest.mark.parametrize("content,line,field", [
    ("num_input_tokens,num_output_tokens\n5,3\n-1,2\n", 3, "num_input_tokens"),
    ("num_input_tokens,num_output_tokens\n5,3\n4,2.5\n", 3, "num_output_tokens"),
    ("num_input_tokens,num_output_tokens\n5,x\n", 2, "num_output_tokens"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,3,4\nnope,1,1\n", 3,
     "TIMESTAMP"),
])
def test_bad_values_are_located(tmp_path, content, line, field):
    path = tmp_path / "t.csv"
    path.write_text(content)
    with pytest.raises(InputError) as err:
        read_workload(path)
    assert (err.value.path, err.value.row, err.value.field) == (str(path), line, field)
    assert f"line {line}" in str(err.value)


def test_bad_cell_past_pyarrows_first_block_is_still_located(tmp_path):
    """pyarrow infers CSV column types from its first 1 MB block; a bad cell further down
    makes the reader fall back to pandas, which reports it by row like any other."""
    rows = 300_000                                      # 1.8 MB of "10,20" lines
    path = tmp_path / "t.csv"
    path.write_text("num_input_tokens,num_output_tokens\n" + "10,20\n" * rows + "10,-\n")
    with pytest.raises(InputError) as err:
        read_workload(path)
    assert (err.value.row, err.value.field) == (rows + 2, "num_output_tokens")
    path.write_text("num_input_tokens,num_output_tokens\n" + "10,20\n" * rows)
    assert read_workload(path)["n_output_tokens"].sum() == 20 * rows


def test_empty_content_and_session_columns_of_a_csv_count_as_absent(tmp_path):
    path = tmp_path / "w.csv"
    pd.read_parquet(dataset_dir("azure-llm-inference-2023-conv") / "workload.parquet"
                    ).head(50).to_csv(path, index=False)       # empty session and list cells
    w = read_trace(path)
    assert w.content is None and "session_id" not in w.table.column_names
    assert w.table.num_rows == 50


def test_missing_columns_empty_and_missing_files(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="num_input_tokens"):
        read_workload(path)
    path.write_text("num_input_tokens,num_output_tokens\n")
    with pytest.raises(InputError, match="no requests"):
        read_workload(path)
    with pytest.raises(InputError, match="no such file"):
        read_workload(tmp_path / "absent.csv")
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="Parquet"):
        read_workload(tmp_path / "x.parquet")


def test_parquet_workload_with_arrivals(tmp_path):
    path = tmp_path / "w.parquet"
    pd.DataFrame({"arrival_s": [0.0, 1.5], "n_input_tokens": [10, 20],
                  "n_output_tokens": [3, 4]}).to_parquet(path)
    w = read_workload(path)
    assert w["arrival_s"].tolist() == [0.0, 1.5] and w["n_output_tokens"].dtype == "int64"


def test_every_bundled_dataset_loads_and_has_a_card_and_licence():
    import archive

    for name in archive.list_datasets():
        meta = archive.info(name)
        folder = archive.dataset_dir(name)
        assert (folder / "README.md").stat().st_size > 300
        assert meta["licence"] and meta["source"] and meta["citation"]
        assert all((folder / f).exists() for f in meta["files"])
        assert len(archive.load(name)) > 0


@pytest.mark.parametrize("content,line,field", [
    ('{"n_input_tokens": true, "n_output_tokens": 3}\n', 1, "n_input_tokens"),
    ('{"n_input_tokens": 4, "n_output_tokens": 3}\n{"n_input_tokens": false, '
     '"n_output_tokens": 3}\n', 2, "n_input_tokens"),
    ('{"n_input_tokens": 4, "n_output_tokens": 3, "arrival_s": true}\n', 1, "arrival_s"),
])
def test_a_boolean_is_not_a_number(tmp_path, content, line, field):
    # pandas reads true as 1: a JSON boolean had been simulated as a one-token prompt
    path = tmp_path / "t.jsonl"
    path.write_text(content)
    with pytest.raises(InputError) as err:
        read_workload(path)
    assert (err.value.row, err.value.field) == (line, field)
