import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from fake_vllm import FakeState, FakeTiming, start

from kavier.cli import main
from kavier.models.library import gpu_library, llm_library


@pytest.fixture()
def server():
    """The loopback fake vLLM server (tests/fake_vllm.py): its state and URL."""
    state = FakeState(model="Llama-3-8B", timing=FakeTiming(0.004, 2e-6, 0.002))
    srv, url = start(state)
    yield state, url
    srv.shutdown()


@pytest.fixture(scope="session")
def llama8b():
    return llm_library().get("Llama-3-8B")


@pytest.fixture(scope="session")
def a10():
    return gpu_library().get("A10")


@pytest.fixture(scope="session")
def sessions_trace(tmp_path_factory):
    """Sessions of growing prompts (shared prefixes), arrivals, token ids."""
    rng = np.random.default_rng(1)
    rows, t = [], 0.0
    for turn in range(6):
        for s in range(8):
            prompt = list(range(s * 10_000, s * 10_000 + 300 * (turn + 1)))
            rows.append({"session_id": f"s{s}", "arrival_s": t, "input_tokens": prompt,
                         "n_input_tokens": len(prompt),
                         "n_output_tokens": int(rng.integers(20, 200))})
            t += float(rng.exponential(0.15))
    path = tmp_path_factory.mktemp("trace") / "sessions.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.fixture(scope="session")
def option_files(tmp_path_factory):
    """Files options take: a calibrated profile (A10), a power profile, extra LLM and GPU
    library entries."""
    d = tmp_path_factory.mktemp("files")
    runner = CliRunner()
    assert runner.invoke(main, ["calibrate", "--output-folder", str(d / "cal")]).exit_code == 0
    capture = "tests/data/nvidia-smi-h100-loop100ms.csv"
    result = runner.invoke(main, ["calibrate-power", capture, "--output-folder", str(d / "pw")])
    assert result.exit_code == 0, result.output
    (d / "llms.toml").write_text(
        '[Tiny-1B]\nparams = 1_000_000_000\nn_layers = 16\nn_heads = 32\nn_kv_heads = 8\n'
        'head_dim = 64\nhidden_dim = 2048\nintermediate_dim = 8192\nvocab_size = 32000\n'
        'bytes_per_param = 2\ntie_word_embeddings = false\nsource = "test"\n')
    (d / "gpus.toml").write_text(
        '[Half-A10]\nvendor = "test"\nmemory_gib = 24\nmemory_bandwidth_gbps = 300\n'
        'fp16_tflops = 62.5\nidle_power_w = 20\nmax_power_w = 150\n'
        'boost_clock_mhz = 1695\nsource = "test"\n')
    return {"profile": d / "cal" / "profile.json", "power": d / "pw" / "power_profile.json",
            "llms": d / "llms.toml", "gpus": d / "gpus.toml"}
