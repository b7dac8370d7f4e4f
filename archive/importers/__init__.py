"""Converters from published trace formats into the archive's tables."""
