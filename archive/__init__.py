"""The LLM Trace Archive: measured performance traces and public workload traces in one form.

>>> import archive
>>> archive.list_datasets()          # doctest: +SKIP
['a10-surf-vllm-llama3-8b', 'azure-llm-inference-2023-conv']
>>> df = archive.load("a10-surf-vllm-llama3-8b")   # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from archive.datasets import dataset_dir, info, kind_of, list_datasets, resolve
from archive.errors import InputError
from archive.traces import read_trace, read_workload

if TYPE_CHECKING:
    import pandas as pd


def load(name: str) -> pd.DataFrame:
    """Load the main table of a bundled dataset (or dataset folder, or file) as a DataFrame.

    Measurement datasets give the :data:`archive.schema.MEASUREMENTS` columns, workload datasets
    the :data:`archive.schema.WORKLOAD` columns, serving runs the :data:`archive.schema.SERVING`
    columns (:func:`archive.serving.read_serving` has their engine section too), carbon
    datasets ``timestamp`` and ``carbon_intensity`` (its first country; see
    :func:`archive.carbon.read_carbon`).

    Raises
    ------
    InputError
        For an unknown name or an unreadable table.
    """
    path = resolve(name)
    kind = kind_of(name) or "measurements"
    if kind == "carbon":
        from archive.carbon import read_carbon

        return read_carbon(path)
    if kind == "serving":
        from archive.serving import read_serving

        return read_serving(name).requests
    if kind != "measurements":
        return read_workload(path)
    from archive.measurements import read_measurements

    return read_measurements(path)


__all__ = ["InputError", "dataset_dir", "info", "list_datasets", "load", "read_trace",
           "read_workload", "resolve"]
