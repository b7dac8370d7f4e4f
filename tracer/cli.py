"""``tracer`` command line (placeholder replaced below)."""
