import pytest

from kavier.models.library import gpu_library, llm_library


@pytest.fixture(scope="session")
def llama8b():
    return llm_library().get("Llama-3-8B")


@pytest.fixture(scope="session")
def a10():
    return gpu_library().get("A10")
