"""Ending a command quietly when the reader of its output goes away (`... | head`)."""

from __future__ import annotations

import os
import sys
from typing import Callable


def run_until_pipe_closes(main: Callable[[], int]) -> int:
    """Return ``main()``'s exit code; if stdout's reader closed the pipe, return 141 without a traceback.

    141 is what a shell reports for a process ended by SIGPIPE. Standard output is pointed at
    the null device first, so the interpreter's final flush does not fail again.
    """
    try:
        return main()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
