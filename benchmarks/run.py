"""Run rdsim's benchmarks: ``python benchmarks/run.py [name ...]``.

Each module ``benchmarks/bench_<name>.py`` exposes ``main()`` and prints its own table of
ratios measured side by side in one run (the machines are shared and noisy: absolute times
drift, ratios hold). Without arguments every module runs.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))


def main(argv: list[str]) -> int:
    names = argv or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {available()}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    for name in names:
        print(f"=== benchmark {name} ===")
        t0 = time.perf_counter()
        importlib.import_module(f"bench_{name}").main()
        print(f"=== {name}: {time.perf_counter() - t0:.0f} s ===\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
