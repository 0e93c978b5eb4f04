"""``python -m inhouse``: the same as the ``inhouse`` command."""

from inhouse.cli import main

main()
