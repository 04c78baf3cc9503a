"""SIGINT and SIGTERM: stop the measurement, keep what it measured, exit 128 + signal number.

Inside the event loop both signals cancel the main task, so every ``async with`` and
``finally`` below it runs: requests in flight are cancelled, the simulated server is
stopped and requests.csv is flushed. The caller then writes the reports and raises
``Interrupted``, which the command line turns into exit status 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any, Awaitable, Iterator, Optional

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The run was stopped by a signal.

    A BaseException, like KeyboardInterrupt, so that ``except Exception`` blocks let it pass.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def raise_interrupted(signum: int, frame: Any) -> None:
    """Signal handler for the synchronous parts of a run (before and after the event loop)."""
    raise Interrupted(signum)


def install_handlers() -> None:
    """Make SIGTERM raise Interrupted like SIGINT raises KeyboardInterrupt, outside the event loop."""
    signal.signal(signal.SIGTERM, raise_interrupted)


class SignalStop:
    """The first signal received while the event loop ran, if any."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None


async def cancel_on_signal(coroutine: Awaitable[Any], stop: SignalStop) -> Any:
    """Await ``coroutine``; SIGINT or SIGTERM cancels it and then raises Interrupted.

    A second signal cancels the task again, which cuts clean-up that is taking too long.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def on_signal(signum: int) -> None:
        if stop.signum is None:
            stop.signum = signum
        task.cancel()

    for signum in HANDLED_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await coroutine
    except asyncio.CancelledError:
        if stop.signum is None:
            raise
        # This is the outermost task of the run, so turning its cancellation into
        # Interrupted hands the signal to the caller instead of losing it.
        raise Interrupted(stop.signum) from None
    finally:
        for signum in HANDLED_SIGNALS:
            loop.remove_signal_handler(signum)
        # asyncio restores SIG_DFL for SIGTERM on removal; put the raising handler back.
        install_handlers()


@contextlib.contextmanager
def signals_deferred(stop: SignalStop) -> Iterator[None]:
    """Record SIGINT and SIGTERM in ``stop`` instead of raising while the block runs.

    Reports are then written whole; the caller checks ``stop.signum`` afterwards.
    """

    def record(signum: int, frame: Any) -> None:
        if stop.signum is None:
            stop.signum = signum

    previous = {signum: signal.signal(signum, record) for signum in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
