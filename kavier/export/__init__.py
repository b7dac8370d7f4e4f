"""export layer of the Kavier simulator (see docs/architecture.md)."""
