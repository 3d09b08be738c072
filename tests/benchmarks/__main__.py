"""Run the benchmarks and print one table per case: ``python -m tests.benchmarks [name ...]``."""

from __future__ import annotations

import importlib
import platform
import sys

SUITES = [
    "enum",
    "transition",
    "create",
    "scrape",
    "pool",
    "tasks",
    "nesting",
    "scale",
    "multiprocess",
    "instructions",
]


def main(argv: list[str]) -> None:
    names = argv or SUITES
    print(f"# Benchmarks: Python {platform.python_version()} on {platform.machine()}\n")
    for name in names:
        module = importlib.import_module(f"tests.benchmarks.bench_{name}")
        print(module.run().render())


if __name__ == "__main__":
    main(sys.argv[1:])
