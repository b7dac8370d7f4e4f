import pytest
from fake_vllm import FakeState, FakeTiming, start

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
