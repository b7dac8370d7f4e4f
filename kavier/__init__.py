"""Kavier: cache-aware simulation of LLM inference.

Modules: :mod:`kavier.library` (LLMs and GPUs as data), :mod:`kavier.timing` (thesis and
roofline timing models), :mod:`kavier.engine` (request timeline), :mod:`kavier.fragments`
(discrete-event export), :mod:`kavier.output` (run folders), :mod:`kavier.cli`.
"""
