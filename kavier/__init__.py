"""Kavier: cache-aware simulation of LLM inference.

Layers, each importing only the ones below it (checked by import-linter in CI, see
``.importlinter``): :mod:`kavier.cli` ← :mod:`kavier.analysis` (efficiency, capacity,
reproduce, sweeps) ← :mod:`calibrate` ← :mod:`kavier.export` (fragments, OpenDC, run folders)
← :mod:`kavier.sim` (engine, KV pool, prefix cache, routers, timeline, summary, energy) ←
:mod:`kavier.models` (LLM and GPU library, timing, power) ← :mod:`archive`.
"""
