"""The engine model in virtual time, which gives token times for a list of arrivals without a server.

Benchmarks use it as the server-side reference for a load schedule. It runs the same
``EngineCore`` with the same admission rule as the real-time ``Engine``, so the difference
between its times and a real run's shows what HTTP, the event loops and the client add.
"""

from __future__ import annotations

from collections.abc import Iterable

from runner.sim.engine import EngineCore, Sequence
from runner.sim.profile import SimProfile


def replay(profile: SimProfile, requests: Iterable[tuple[float, int, int]]) -> list[Sequence]:
    """Run requests through the engine model until all finish, and return their sequences in input order.

    Each request is (arrival time in seconds, prompt tokens, output tokens). A request joins the
    first step that starts at or after its arrival, and an idle engine starts a step at the
    arrival itself, as the real-time engine does. Raises ValueError for a request that can
    never fit the KV cache.
    """
    sequences = [
        Sequence(str(index), prompt_tokens, output_tokens, output_tokens, arrived_at)
        for index, (arrived_at, prompt_tokens, output_tokens) in enumerate(requests)
    ]
    pending = sorted(sequences, key=lambda seq: seq.arrived_at)
    core = EngineCore(profile)
    next_arrival = 0
    now = 0.0
    while next_arrival < len(pending) or not core.idle:
        if core.idle:
            now = max(now, pending[next_arrival].arrived_at)
        while next_arrival < len(pending) and pending[next_arrival].arrived_at <= now:
            core.add(pending[next_arrival])
            next_arrival += 1
        step = core.start_step(now)
        # Every waiting sequence has arrived by now, and one always fits an engine with nothing running.
        assert step is not None
        core.finish_step()
        now = step.started_at + step.duration
    return sequences
