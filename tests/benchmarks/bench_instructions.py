"""The hot paths in instructions per operation, counted by valgrind's callgrind.

Wall-clock medians on a shared machine move by ten to twenty percent between runs; an
instruction count does not move at all for the same interpreter and inputs, whatever else
the machine is doing. Each case (`counted`) runs twice in one process, `SHORT` and `LONG`
operations deep after a warm-up, each run counted on its own, and the difference over the
extra operations is the cost of one: what a run costs once (an event loop) cancels out.
Instructions are not time (a cache miss costs hundreds of cycles, an instruction a
fraction of one), so this table backs up the timed ones and does not replace them.
Without valgrind it says so and counts nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from ._harness import Table

SHORT, LONG = 1_000, 3_000

FLOOR, FLOOR_CALLS = "floor, asyncio", "floor + 3 calls, asyncio"
ANCHOR = "prometheus-async @time + @count_exceptions + Enum"
TRANSITIONS = [
    (FLOOR, None),
    (FLOOR_CALLS, FLOOR),
    ("ours, no callbacks, asyncio", FLOOR),
    ("ours, labelled, asyncio", FLOOR),
    ("ours, condition + before + after (sync), asyncio", FLOOR_CALLS),
]
JOBS = [
    (f"{name}, {backend}", None if name == ANCHOR else f"{ANCHOR}, {backend}")
    for backend in ("asyncio", "trio")
    for name in (
        ANCHOR,
        "track() on a machine per worker",
        "@Jobs.task, a machine per call",
    )
]
MULTIPROCESS = "ours, labelled, asyncio, multiprocess mode"


def per_operation(case: str, env: dict[str, str]) -> float:
    """Instructions per operation of `case`: the runs `SHORT` and `LONG` operations deep,
    in one process, each counted on its own."""
    with tempfile.TemporaryDirectory() as directory:
        out = os.path.join(directory, "callgrind.out")
        command = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",  # the driver turns it on after its imports
            "--collect-atstart=no",
            "--toggle-collect=builtin_breakpoint",
            "--dump-after=builtin_breakpoint",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-m",
            "tests.benchmarks.counted",
            case,
            str(SHORT),
            str(LONG),
        ]
        # Fixed hash seed and address layout: the same run twice counts the same.
        subprocess.run(
            ["setarch", "-R", *command] if shutil.which("setarch") else command,
            env={**os.environ, "PYTHONHASHSEED": "0", "COUNTED_INSTRUMENT": "1", **env},
            capture_output=True,
            check=True,
        )
        totals = []
        for dump in (1, 2):
            with open(f"{out}.{dump}") as file:
                found = re.search(r"^totals: (\d+)", file.read(), re.MULTILINE)
            assert found is not None, f"no totals in callgrind dump {dump}"
            totals.append(int(found.group(1)))
    short, long = totals
    return (long - short) / (LONG - SHORT)


def run() -> Table:
    table = Table("Instructions per operation (callgrind)", unit="instructions")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        table.note = "valgrind is not installed: nothing counted."
        return table
    labelled = "ours, labelled, asyncio"
    cases = [*TRANSITIONS, *JOBS]
    with tempfile.TemporaryDirectory() as directory, ThreadPoolExecutor(os.cpu_count()) as pool:
        envs = [{} for _ in cases] + [{"PROMETHEUS_MULTIPROC_DIR": directory}]
        names = [case for case, _ in cases] + [labelled]
        counts = list(pool.map(per_operation, names, envs))
    for (case, anchor), instructions in zip(cases, counts):
        table.add(case, instructions, anchor)
    task = "@Jobs.task, a machine per call"
    by_name = dict(zip(names, counts))
    table.add(f"{task}, trio against asyncio", by_name[f"{task}, trio"], f"{task}, asyncio")
    table.add(MULTIPROCESS, counts[-1], labelled)
    return table
