"""Print the lowest versions pyproject.toml declares, as pins: ``name==X`` per line.

The runtime dependencies, plus trio from the ``trio`` extra: the lowest-versions job
installs exactly these, so that the declared lower bounds are the ones tested.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

WANTED = ("anyio", "transitions", "prometheus_client", "trio")


def main() -> None:
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    pins = {}
    for name, version in re.findall(r'"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)', text):
        if name in WANTED and name not in pins:
            pins[name] = version
    missing = [name for name in WANTED if name not in pins]
    if missing:
        sys.exit(f"pyproject.toml declares no lower bound for {', '.join(missing)}")
    print("\n".join(f"{name}=={pins[name]}" for name in WANTED))


if __name__ == "__main__":
    main()
