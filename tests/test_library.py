import json

import pytest

from archive.errors import InputError
from kavier.models.library import gpu_library, llm_from_hf_config, llm_library

LLAMA3_8B_CONFIG = {  # meta-llama/Meta-Llama-3-8B config.json (shapes)
    "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def test_bundled_entries_cover_the_thesis_and_das6():
    llms, gpus = llm_library().names(), gpu_library().names()
    for name in ("Llama-3-8B", "Llama-2-13B", "Granite-20B", "MPT-30B", "OPT-30B", "OPT-175B",
                 "BLOOM-176B"):
        assert name in llms
    for name in ("A10", "A100-40GB", "A100-80GB", "L4", "L40S", "H100-PCIe", "H100-SXM", "H200",
                 "A4000", "A6000"):
        assert name in gpus
    assert all(gpu_library().get(g).source for g in gpus)


def test_kv_bytes_are_gqa_aware_and_the_thesis_formula_overstates_llama3(llama8b):
    assert llama8b.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    assert llama8b.kv_bytes_per_token_thesis() / llama8b.kv_bytes_per_token == 4


def test_unknown_names_list_the_known_ones():
    with pytest.raises(InputError) as err:
        gpu_library().get("B300")
    assert "A10" in str(err.value) and "--gpu" in str(err.value)
    assert llm_library().get("llama-3-8b").name == "Llama-3-8B"


def test_hf_config_gives_the_library_parameter_count(llama8b, tmp_path):
    spec = llm_from_hf_config(LLAMA3_8B_CONFIG, name="x")
    assert abs(spec.params - llama8b.params) / llama8b.params < 1e-4
    assert (spec.n_kv_heads, spec.head_dim, spec.bytes_per_param) == (8, 128, 2)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA3_8B_CONFIG))
    assert llm_from_hf_config(path).params == spec.params
    with pytest.raises(InputError, match="num_hidden_layers"):
        llm_from_hf_config({"hidden_size": 1})


def test_user_library_file_adds_and_validates(tmp_path):
    good = tmp_path / "gpus.toml"
    good.write_text('[MyGPU]\nvendor = "X"\nmemory_gib = 8\nmemory_bandwidth_gbps = 100\n'
                    'fp16_tflops = 10\nidle_power_w = 5\nmax_power_w = 50\n')
    assert gpu_library(good).get("mygpu").fp16_tflops == 10
    bad = tmp_path / "bad.toml"
    bad.write_text('[MyGPU]\nvendor = "X"\nmemory_gib = -8\nmemory_bandwidth_gbps = 100\n'
                   'fp16_tflops = 10\nidle_power_w = 5\nmax_power_w = 50\n')
    with pytest.raises(InputError, match="memory_gib"):
        gpu_library(bad)
    with pytest.raises(InputError, match="lacks"):
        bad.write_text('[MyGPU]\nvendor = "X"\n')
        gpu_library(bad)
    for literal in ("nan", "inf"):      # TOML reads both as floats; they pass "> 0" checks
        bad.write_text(f'[MyGPU]\nvendor = "X"\nmemory_gib = 8\nmemory_bandwidth_gbps = '
                       f'{literal}\nfp16_tflops = 10\nidle_power_w = 5\nmax_power_w = 50\n')
        with pytest.raises(InputError, match=f"memory_bandwidth_gbps.*positive finite number, "
                                             f"got {literal}"):
            gpu_library(bad)


def test_a_library_entry_can_name_a_hugging_face_config(tmp_path, llama8b):
    # a model outside the bundled library, added by its config.json and the names a serving
    # run or a trace calls it by
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "config.json").write_text(json.dumps(LLAMA3_8B_CONFIG))
    library = tmp_path / "llms.toml"
    library.write_text('[My-8B]\nhf_config = "models/config.json"\n'
                       'aliases = ["acme/my-8b-instruct"]\n')
    spec = llm_library(library).get("acme/My-8B-Instruct")
    assert spec.name == "My-8B" and spec.aliases == ("acme/my-8b-instruct",)
    assert spec.params == llm_from_hf_config(LLAMA3_8B_CONFIG).params
    assert abs(spec.params - llama8b.params) / llama8b.params < 1e-4
    assert "config.json" in spec.source
    library.write_text('[My-8B]\nhf_config = "models/config.json"\nn_layers = 2\n')
    with pytest.raises(InputError, match="shapes come from the config; remove"):
        llm_library(library)
    unmodelled = {**LLAMA3_8B_CONFIG, "sliding_window": 4096, "use_sliding_window": True}
    (tmp_path / "models" / "config.json").write_text(json.dumps(unmodelled))
    library.write_text('[My-8B]\nhf_config = "models/config.json"\n')
    with pytest.raises(InputError, match="sliding"):
        llm_library(library)
    with pytest.raises(InputError, match="hf_config = its Hugging Face config.json"):
        llm_library().get("acme/unknown")


def test_an_fp8_kv_cache_halves_the_bytes_per_token_and_doubles_the_pool(llama8b, a10):
    from kavier.models.library import with_kv_cache_dtype
    from kavier.sim.config import kv_pool_blocks

    fp8 = with_kv_cache_dtype(llama8b, "fp8")
    assert fp8.kv_bytes_per_token == llama8b.kv_bytes_per_token / 2 == 65_536
    assert fp8.weight_bytes == llama8b.weight_bytes and with_kv_cache_dtype(
        llama8b, "auto") is llama8b
    pool = kv_pool_blocks(llama8b, a10, 16)
    assert kv_pool_blocks(fp8, a10, 16) in (2 * pool, 2 * pool + 1)
    with pytest.raises(InputError, match="'int8_per_token_head' is not modelled"):
        with_kv_cache_dtype(llama8b, "int8_per_token_head")
