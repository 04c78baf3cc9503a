"""Per-request ground-truth log of the simulated server, one JSON object per line.

Times are ``time.perf_counter()`` seconds of the server process (CLOCK_MONOTONIC on Linux), so
they compare directly with a client's perf_counter times on the same machine.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from runner.sim.wire import dumps

logger = logging.getLogger(__name__)

# Seconds between flushes, so a reader sees finished requests soon without a write per request.
FLUSH_INTERVAL = 1.0


class GroundTruthLog:
    """Buffered JSON-lines writer; flushed every FLUSH_INTERVAL seconds and on close."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "wb", buffering=1 << 20)
        self.records = 0

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(dumps(record) + b"\n")
        self.records += 1

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
            logger.info("wrote %s ground-truth records to %s", self.records, self.path)

    async def flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            self.flush()
