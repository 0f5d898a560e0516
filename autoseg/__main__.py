"""``python -m autoseg``: the same as the ``autoseg`` command."""

from autoseg.cli import main

main()
