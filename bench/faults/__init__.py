"""The fault-and-abuse suite: each ``case_*.py`` module measures some faults against real
``inhouse serve`` processes on loopback and returns table rows; ``python -m bench.faults``
runs them all and prints one table."""
