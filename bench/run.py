"""Run benchmark scripts by name: `python -m bench.run [NAMES...]`, the entry of `make bench`.

With no names it runs the quick benchmarks, in order. `--list` prints every name with
what it measures and whether it is quick. A benchmark's own options are reached by
running its module directly, for example `python -m bench.peers --tools runner aiperf`.
"""

from __future__ import annotations

import argparse
import importlib
import time
from typing import NamedTuple


class Benchmark(NamedTuple):
    module: str
    description: str
    # Quick benchmarks run when no name is given.
    quick: bool


BENCHMARKS = {
    "timing": Benchmark("bench.timing", "runner TTFT and ITL error against a scripted server's log (~6 min)", True),
    "peers": Benchmark("bench.peers", "runner beside evalscope, aiperf and guidellm: ceiling, timing, "
                                      "pacing, start-up (~25 min; installs the peers once)", True),
    "report": Benchmark("bench.report_speed", "python -m runner.report over 200 runs of 5,000 requests (~3 min)", True),
    "sla_capacity": Benchmark("bench.sla_capacity", "fine sweep that fixes the reference SLA capacity (~15 min)", False),
    "engine_reference": Benchmark("bench.engine_reference", "rate capacity of the sim's engine model in virtual "
                                                            "time, 20 seeds x 40,000 requests per rate (~5 min)", False),
    "sla_tune_virtual": Benchmark("bench.sla_tune_virtual", "rate-tune answers for 200 seeds against the engine "
                                                            "model in virtual time (~3 min)", False),
    "sla_vs_plain": Benchmark("bench.sla_vs_plain", "SLA tune against the plain doubling-and-bisection search "
                                                    "(~30 min)", False),
    "calibration": Benchmark("bench.calibration", "self-calibrated client ceiling against the peer benchmark's "
                                                  "ceiling, and the calibration's cost (~3 min)", False),
    "workers": Benchmark("bench.workers", "requests/s and TTFT error with 1 and 2 worker processes (~5 min)", False),
    "soak": Benchmark("bench.soak", "memory of a long steady run (RSS every 10 s; 30 min by default)", False),
    "memory": Benchmark("bench.memory", "memory of a 100,000-request load point (RSS every 2 s; ~15 min)", False),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run benchmark scripts by name.")
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: the quick ones)")
    parser.add_argument("--list", action="store_true", help="print the benchmark names and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, benchmark in BENCHMARKS.items():
            print(f"{name:10} {'quick' if benchmark.quick else 'slow ':5}  {benchmark.description}")
        return 0
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)} (see --list)")
    names = args.names or [name for name, benchmark in BENCHMARKS.items() if benchmark.quick]
    status = 0
    for name in names:
        started = time.monotonic()
        print(f"== {name}", flush=True)
        module = importlib.import_module(BENCHMARKS[name].module)
        result = module.main([])
        print(f"== {name} finished in {time.monotonic() - started:.0f} s with status {result}", flush=True)
        status = status or result
    return status


if __name__ == "__main__":
    raise SystemExit(main())
