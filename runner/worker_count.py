"""How many load workers a load point uses: the automatic rule, the split of a plan, and the caps.

A plan gives each worker at least one concurrency slot and one request, so ``load.workers``
above either count is capped. Worker processes on this machine beyond its usable CPU cores
share cores. Both cases are logged as a warning once per process, with the numbers.
"""

from __future__ import annotations

import logging
import os

from runner.config import LoadConfig
from runner.load import LoadPlan, Share

log = logging.getLogger(__name__)

# (kind, count, limit) of the warnings already logged, so an SLA tune that spawns workers
# for every repeat logs each warning once.
_warned: set[tuple[str, int, int]] = set()


def auto_workers(plan: LoadPlan) -> int:
    """Return the worker count for load.workers=null, which is 1 for now.

    NOTE: two workers beat one on a 2-core machine only when no other work uses the cores.
    With other processes at 12 % or less, bench/workers.py measured 1.56 to 1.70 times the
    requests/s of one worker. Whenever other jobs took half the machine, two workers sent
    fewer requests/s than one (docs/benchmarks.md). Each repeat also spawns the workers
    again, and the simulated server shares the machine. So workers are used only when
    load.workers is set above 1.
    """
    del plan
    return 1


def workers_for(load: LoadConfig, plan: LoadPlan) -> int:
    """Return the number of workers to use for ``plan``: load.workers, or the automatic rule."""
    return load.workers if load.workers is not None else auto_workers(plan)


def split_plan(plan: LoadPlan, workers: int) -> list[Share]:
    """Split ``plan`` into at most ``workers`` shares; never more than there are requests or slots."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    count = min(workers, max(plan.total, 1))
    if plan.parallel is not None:
        count = min(count, plan.parallel)
    return [Share(worker, count) for worker in range(count)]


def usable_cores() -> int:
    """Return the number of CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def warn_if_capped(requested: int, plan: LoadPlan, used: int, *, local: bool) -> None:
    """Log a warning when ``plan`` uses fewer workers than requested, or more processes than cores.

    ``local`` is True for worker processes on this machine, False for Ray actors.
    """
    if used < requested and ("plan", requested, used) not in _warned:
        _warned.add(("plan", requested, used))
        slots = f"load.parallel={plan.parallel} concurrency slots" if plan.parallel is not None else "no slot cap"
        log.warning(
            "load.workers=%d, but only %d workers are used: each worker needs at least one concurrency "
            "slot and one request, and this load point has %s and %d requests",
            requested, used, slots, plan.total,
        )
    cores = usable_cores()
    if local and used > cores and ("cores", used, cores) not in _warned:
        _warned.add(("cores", used, cores))
        log.warning(
            "%d load worker processes run on %d usable CPU cores, so they share cores and their schedule "
            "lateness and event-loop lag grow; set load.workers to %d or fewer",
            used, cores, cores,
        )
