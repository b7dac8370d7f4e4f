"""``python -m kavier`` runs the ``kavier`` command line."""

from kavier.cli import entry

entry()
