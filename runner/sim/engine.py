"""Timing model of a continuous-batching inference engine.

``EngineCore`` is the pure model: it works on times passed in by the caller, so tests can run
it in virtual time. ``Engine`` drives it in real time on the event loop. Per step:

1. Admit waiting sequences that arrived by the step's start, in arrival order, while a sequence
   slot (``max_num_seqs``), KV-cache room (prompt + max_tokens tokens, reserved until the
   sequence finishes) and step token budget are free. Admission stops at the first sequence
   that does not fit, as in vLLM's FIFO policy.
2. Spend the token budget (``max_batched_tokens``): one token per decoding sequence first, then
   prompt chunks of the prefilling sequences in admission order (chunked prefill).
3. The step lasts ``step_base + step_per_seq * running + step_per_prefill_token * prefilled``.
4. At its end every decoding sequence emits one token, and every sequence whose prefill
   completed in this step emits its first token.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from runner.sim.profile import SimProfile

logger = logging.getLogger(__name__)


def plan_output(
    rng: random.Random, max_tokens: int, min_tokens: int, ignore_eos: bool, eos_probability: float
) -> tuple[int, str]:
    """Draw the number of tokens a request will generate and its finish_reason.

    Without ignore_eos, each token from the min_tokens-th on is the last one with probability
    eos_probability (the end-of-sequence token itself is not counted or sent).
    """
    if ignore_eos or eos_probability <= 0:
        return max_tokens, "length"
    for count in range(max(min_tokens, 1), max_tokens + 1):
        if rng.random() < eos_probability:
            return count, "stop"
    return max_tokens, "length"


@dataclass(eq=False, slots=True)
class Sequence:
    """One request inside the engine."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    # Tokens this sequence will generate (<= max_tokens), drawn at arrival by plan_output.
    target_tokens: int
    # Arrival on the engine's clock; the sequence joins the first step starting at or after it.
    arrived_at: float
    admitted_at: Optional[float] = None
    # Prompt tokens processed so far.
    prefilled: int = 0
    # Tokens emitted so far.
    generated: int = 0
    # End times of the steps that emitted each token (engine time, seconds).
    token_times: list[float] = field(default_factory=list)
    finished_at: Optional[float] = None
    aborted: bool = False
    # Called by Engine after each emitted token; the server uses it to wake the handler.
    on_token: Optional[Callable[["Sequence"], None]] = None

    @property
    def done(self) -> bool:
        return self.finished_at is not None or self.aborted

    @property
    def kv_tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens


@dataclass(frozen=True, slots=True)
class Step:
    """One scheduled engine step."""

    started_at: float
    duration: float
    running: int
    prefill_tokens: int
    decode_tokens: int


class EngineCore:
    """Scheduler state and step arithmetic, free of any clock."""

    def __init__(self, profile: SimProfile) -> None:
        self.profile = profile
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.kv_used = 0
        # Prompt tokens each sequence prefills in the step in flight.
        self._chunks: list[tuple[Sequence, int]] = []
        # Sequences that decode one token in the step in flight.
        self._decoding: list[Sequence] = []
        self._step: Optional[Step] = None

    def fits_ever(self, prompt_tokens: int, max_tokens: int) -> bool:
        return prompt_tokens + max_tokens <= self.profile.kv_cache_tokens

    def add(self, seq: Sequence) -> None:
        if not self.fits_ever(seq.prompt_tokens, seq.max_tokens):
            raise ValueError(f"sequence {seq.request_id} needs {seq.kv_tokens} KV-cache tokens, more than exist")
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> None:
        if seq.done:
            return
        seq.aborted = True
        if seq in self.running:
            self.running.remove(seq)
            self.kv_used -= seq.kv_tokens
        elif seq in self.waiting:
            self.waiting.remove(seq)

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    def start_step(self, now: float) -> Optional[Step]:
        """Admit sequences and plan one step starting at ``now``; None when there is no work."""
        profile = self.profile
        decoding = [seq for seq in self.running if seq.prefilled == seq.prompt_tokens]
        budget = profile.max_batched_tokens - len(decoding)
        chunks: list[tuple[Sequence, int]] = []

        for seq in self.running:
            if seq.prefilled < seq.prompt_tokens and budget > 0:
                chunk = min(seq.prompt_tokens - seq.prefilled, budget)
                chunks.append((seq, chunk))
                budget -= chunk

        while self.waiting and budget > 0 and len(self.running) < profile.max_num_seqs:
            seq = self.waiting[0]
            # A step that starts before an arrival cannot admit it. This matters when the real-time
            # driver catches up on steps whose start lies in the past.
            if seq.arrived_at > now or self.kv_used + seq.kv_tokens > profile.kv_cache_tokens:
                break
            self.waiting.popleft()
            seq.admitted_at = now
            self.running.append(seq)
            self.kv_used += seq.kv_tokens
            chunk = min(seq.prompt_tokens, budget)
            chunks.append((seq, chunk))
            budget -= chunk

        if not self.running:
            self._step = None
            return None
        prefill_tokens = sum(chunk for _, chunk in chunks)
        duration = (
            profile.step_base
            + profile.step_per_seq * len(self.running)
            + profile.step_per_prefill_token * prefill_tokens
        )
        self._chunks = chunks
        self._step = Step(now, duration, len(self.running), prefill_tokens, len(decoding))
        self._decoding = decoding
        return self._step

    def finish_step(self) -> list[Sequence]:
        """Apply the step in flight at its end time; return the sequences that emitted a token."""
        step = self._step
        if step is None:
            return []
        end = step.started_at + step.duration
        emitted: list[Sequence] = []
        for seq in self._decoding:
            if not seq.aborted:
                emitted.append(seq)
        for seq, chunk in self._chunks:
            if seq.aborted:
                continue
            seq.prefilled += chunk
            if seq.prefilled == seq.prompt_tokens:
                emitted.append(seq)
        for seq in emitted:
            seq.generated += 1
            seq.token_times.append(end)
            if seq.generated >= seq.target_tokens:
                seq.finished_at = end
                self.running.remove(seq)
                self.kv_used -= seq.kv_tokens
        self._step = None
        self._chunks = []
        self._decoding = []
        return emitted


class Engine:
    """Real-time driver: one task runs steps back to back on absolute times.

    Each step ends at ``previous end + duration``, never at ``now + duration``, so event-loop
    delays shift single deliveries but do not accumulate. After a delay the task runs the
    missed steps at once, and a sequence that arrived during the delay joins the first step
    starting after its arrival, so the timeline is the one ``EngineCore`` gives in virtual time
    for the same arrivals. With no work the task waits on an event instead of polling.
    """

    def __init__(self, profile: SimProfile, clock: Callable[[], float] = time.perf_counter) -> None:
        self.core = EngineCore(profile)
        self.clock = clock
        self.steps = 0
        self._wakeup = asyncio.Event()

    def submit(self, seq: Sequence) -> None:
        self.core.add(seq)
        self._wakeup.set()

    def abort(self, seq: Sequence) -> None:
        self.core.abort(seq)

    async def run(self) -> None:
        core = self.core
        next_start: Optional[float] = None
        while True:
            if core.idle:
                self._wakeup.clear()
                await self._wakeup.wait()
                next_start = None
            if next_start is None:
                next_start = self.clock()
            step = core.start_step(next_start)
            if step is None:
                # Nothing runs, and every waiting sequence arrived after next_start, so the
                # timeline restarts at the first arrival.
                next_start = None
                first_arrival = core.waiting[0].arrived_at if core.waiting else self.clock()
                await asyncio.sleep(max(first_arrival - self.clock(), 0.0))
                continue
            end = step.started_at + step.duration
            delay = end - self.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            self.steps += 1
            for seq in core.finish_step():
                if seq.on_token is not None:
                    seq.on_token(seq)
            next_start = end
