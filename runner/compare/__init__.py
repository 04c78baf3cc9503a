"""Comparing two run folders: ``python -m runner.compare RUN_A RUN_B``.

``compare`` reads both folders and returns a ``Comparison``: every summary.csv metric at the
load points both runs measured, the SLA results matched on their criteria, and one warning
per reason the runs may not be comparable. ``write_files`` writes it as compare.csv and
compare.md.
"""

from runner.compare.diff import Comparison, compare
from runner.compare.render import write_files

__all__ = ["Comparison", "compare", "write_files"]
