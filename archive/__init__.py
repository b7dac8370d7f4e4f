"""The LLM Trace Archive: measured performance traces and public workload traces in one form.

>>> import archive
>>> archive.list_datasets()          # doctest: +SKIP
['a10-surf-vllm-llama3-8b', 'azure-llm-inference-2023-conv']
>>> df = archive.load("a10-surf-vllm-llama3-8b")   # doctest: +SKIP
"""

from archive.datasets import dataset_dir, info, list_datasets, load
from archive.errors import InputError
from archive.traces import read_trace, read_workload

__all__ = ["InputError", "dataset_dir", "info", "list_datasets", "load", "read_trace",
           "read_workload"]
