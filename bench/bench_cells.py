"""Microbenchmark of the cell hot path: µs per seal/open with cached subkeys.

Run: .venv/bin/python bench/bench_cells.py [--number N]
Target (DESIGN): a cached seal or open of a 64-byte value in <= 10 µs.
"""

from __future__ import annotations

import argparse
import os
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

# Runnable as a plain script from a checkout, without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.crypto.cells import CellKey

SIZES = (16, 64, 1024, 65536)
COLUMN = "public.patients.ssn"


def _per_op_us(stmt: Callable[[], object], number: int, repeat: int = 5) -> float:
    # Best of several runs: the least disturbed by the rest of the machine.
    times = timeit.repeat(stmt, number=number, repeat=repeat)
    return min(times) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--number", type=int, default=20000, help="ops per timing run")
    args = parser.parse_args()

    key = CellKey(42, "acme", os.urandom(32))
    print(f"{'suite':<5} {'size':>6} {'seal µs':>9} {'open µs':>9}")
    for deterministic, name in ((False, "GCM"), (True, "SIV")):
        for size in SIZES:
            value = os.urandom(size)
            cell = key.seal(COLUMN, value, deterministic=deterministic)  # warms the cache
            number = max(200, args.number * 64 // max(size, 64))

            def seal(value: bytes = value, deterministic: bool = deterministic) -> bytes:
                return key.seal(COLUMN, value, deterministic=deterministic)

            def open_(cell: bytes = cell) -> bytes:
                return key.open(COLUMN, cell)

            print(
                f"{name:<5} {size:>6} {_per_op_us(seal, number):>9.2f} "
                f"{_per_op_us(open_, number):>9.2f}"
            )


if __name__ == "__main__":
    main()
