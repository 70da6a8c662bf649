"""``python -m r2``: the ``r2`` command."""

from r2.cli import main

main()
