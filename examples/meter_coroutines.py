"""Every call of a coroutine metered by its own TaskMachine.

`fetch()` pretends to download URLs: most calls succeed, some fail, and some are too slow
for the caller, who cancels them. `@Fetch.task` runs each call in a fresh `Fetch` machine
(pending -> running -> succeeded / failed / cancelled), labelled with the URL's host, so
that the metrics show the calls in flight (`myapp_fetch_state_machines`), their outcomes
(`myapp_fetch_state_transitions_total`) and their durations
(`myapp_fetch_state_duration_seconds{myapp_fetch_state="running"}`).
docs/how-to/meter-coroutines.md explains it.

    python examples/meter_coroutines.py
    python examples/meter_coroutines.py --calls 200 --backend trio
"""

from __future__ import annotations

import argparse
from urllib.parse import urlsplit

import anyio
from prometheus_client import CollectorRegistry, generate_latest

from statemachine_metrics import MachineCollector, TaskMachine

# A registry of its own, so that importing this module (as the tests do) never clashes
# with other metrics; a service would use prometheus_client.REGISTRY.
REGISTRY = CollectorRegistry()


class Fetch(TaskMachine, namespace="myapp", labelnames=("host",), registry=None):
    """State of each fetch"""


REGISTRY.register(MachineCollector(Fetch))

HOSTS = ("a.example", "b.example", "c.example")


class NotFound(Exception):
    pass


def host_of(url: str, delay: float) -> dict[str, object]:
    """A call's label values, from its arguments."""
    return {"host": urlsplit(url).hostname}


@Fetch.task(labels=host_of)
async def fetch(url: str, delay: float) -> int:
    """Download `url` (it takes `delay` seconds); return its size."""
    await anyio.sleep(delay)
    if url.endswith("/missing"):
        raise NotFound(url)
    return len(url)


async def caller(url: str, delay: float, patience: float, results: dict[str, int]) -> None:
    with anyio.move_on_after(patience):
        try:
            await fetch(url, delay)
            results["succeeded"] += 1
        except NotFound:
            results["failed"] += 1
        return
    results["cancelled"] += 1


def outcomes() -> dict[str, float]:
    """Outcome counts, read back from the metrics."""
    counts: dict[str, float] = {}
    for state, trigger in (("succeeded", "succeed"), ("failed", "fail"), ("cancelled", "cancel")):
        labels = {"from": "running", "to": state, "trigger": trigger}
        value = REGISTRY.get_sample_value("myapp_fetch_state_transitions_total", labels)
        counts[state] = value or 0.0
    return counts


async def main(calls: int = 30, delay: float = 0.01) -> dict[str, int]:
    """Make `calls` concurrent calls; every 7th is too slow, every 5th is missing.

    Returns how the calls ended, as the callers saw it.
    """
    results = {"succeeded": 0, "failed": 0, "cancelled": 0}
    async with anyio.create_task_group() as group:
        for i in range(calls):
            path = "/missing" if i % 5 == 4 else f"/page/{i}"
            slow = i % 7 == 6
            url = f"https://{HOSTS[i % len(HOSTS)]}{path}"
            group.start_soon(caller, url, delay * (20 if slow else 1), delay * 5, results)
        await anyio.sleep(delay / 2)
        in_flight = REGISTRY.get_sample_value(
            "myapp_fetch_state_machines", {"myapp_fetch_state": "running"}
        )
        print(f"in flight: {in_flight:.0f}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--delay", type=float, default=0.1, help="seconds per call")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    print("callers saw:", anyio.run(main, args.calls, args.delay, backend=args.backend))
    print("metrics say:", outcomes())
    print(generate_latest(REGISTRY).decode())
