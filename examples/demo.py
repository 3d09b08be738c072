"""A worker pool you can watch: machines with labels, metered jobs, a state timeout.

Run with ``make demo`` (or ``python examples/demo.py --help``). Metrics are served on
http://127.0.0.1:8000/metrics while the terminal shows how many machines are in each state
and how fast they move. Ctrl-C stops it cleanly.
"""

from __future__ import annotations

import argparse
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from prometheus_client import REGISTRY, CollectorRegistry

from statemachine_metrics import MeteredMachine, TaskMachine, serve_metrics


class Worker(MeteredMachine, namespace="demo", labelnames=("worker",)):
    """Current state of a pool worker"""

    states = ["idle", "running", "error"]
    transitions = [
        ["start", "idle", "running"],
        ["finish", "running", "idle"],
        ["fail", "running", "error"],
        ["recover", "error", "idle"],
    ]
    # A worker that failed rests in `error` for a second, then the timeout brings it back.
    timeouts = {"error": (1.0, "recover")}


class Job(TaskMachine, namespace="demo", labelnames=("kind",)):
    """State of a job"""


class JobFailed(Exception):
    pass


@dataclass
class Settings:
    """How the pool behaves; the test makes it fast."""

    workers: int = 6
    job_seconds: tuple[float, float] = (0.2, 1.5)
    pause_seconds: tuple[float, float] = (0.05, 0.5)
    failure_rate: float = 0.1
    kinds: tuple[str, ...] = ("resize", "upload", "report")
    rng: random.Random = field(default_factory=random.Random)


def make_job(settings: Settings) -> Callable[[str], object]:
    @Job.task(labels=lambda kind: {"kind": kind})
    async def job(kind: str) -> None:
        await anyio.sleep(settings.rng.uniform(*settings.job_seconds))
        if settings.rng.random() < settings.failure_rate:
            raise JobFailed(f"{kind} failed")

    return job


async def work(name: str, settings: Settings) -> None:
    """One worker: take jobs forever; a failed job leaves the worker in error for a while."""
    job = make_job(settings)
    async with Worker(labels={"worker": name}) as worker:
        tracked = worker.track(enter="start", success="finish", error="fail")
        while True:
            if worker.state == "error":
                await anyio.sleep(0.05)  # the timeout recovers it
                continue
            try:
                async with tracked:
                    await job(settings.rng.choice(settings.kinds))  # type: ignore[misc]
            except JobFailed:
                pass
            await anyio.sleep(settings.rng.uniform(*settings.pause_seconds))


def snapshot(registry: CollectorRegistry) -> tuple[dict[str, dict[str, float]], float]:
    """Live machines per state for each class, and the total of transitions so far."""
    counts: dict[str, dict[str, float]] = {}
    transitions = 0.0
    for family in registry.collect():
        if family.name.endswith("_state_machines"):
            label = family.name.removesuffix("_machines")
            counts[label] = {s.labels[label]: s.value for s in family.samples}
        elif family.name.endswith("_state_transitions") and family.name.startswith("demo_"):
            transitions += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return counts, transitions


def render(counts: dict[str, dict[str, float]], rate: float, url: str) -> object:
    try:
        from rich.table import Table
    except ImportError:  # the plain view, without the demo extra
        parts = [
            f"{name}: " + " ".join(f"{s}={int(v)}" for s, v in states.items())
            for name, states in counts.items()
        ]
        return " | ".join(parts) + f" | {rate:.1f} transitions/s"
    table = Table(title=f"statemachine_metrics demo — {url}", caption="Ctrl-C stops")
    table.add_column("machine")
    table.add_column("state")
    table.add_column("live", justify="right")
    for name, states in counts.items():
        for state, value in states.items():
            table.add_row(name, state, str(int(value)))
            name = ""
    table.add_row("", "transitions/s", f"{rate:.1f}")
    return table


async def show(registry: CollectorRegistry, url: str, live: bool, period: float) -> None:
    """Refresh the terminal view every `period` seconds."""
    last_total, last_time = snapshot(registry)[1], time.monotonic()
    display = None
    if live:
        try:
            from rich.live import Live

            display = Live(auto_refresh=False)
        except ImportError:
            display = None
    if display is not None:
        display.start()
    try:
        while True:
            await anyio.sleep(period)
            counts, total = snapshot(registry)
            now = time.monotonic()
            rate = (total - last_total) / (now - last_time)
            last_total, last_time = total, now
            view = render(counts, rate, url)
            if display is not None:
                display.update(view, refresh=True)  # type: ignore[arg-type]
            elif live:
                print(view)
    finally:
        if display is not None:
            display.stop()


async def run_demo(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    settings: Settings | None = None,
    duration: float | None = None,
    live: bool = True,
    registry: CollectorRegistry = REGISTRY,
    started: Callable[[int], None] | None = None,
) -> None:
    """Run the pool and serve its metrics until Ctrl-C (or for `duration` seconds)."""
    settings = settings or Settings()
    async with anyio.create_task_group() as tg:
        bound = await tg.start(serve_metrics, port, host, registry)
        url = f"http://{host}:{bound}/metrics"
        if started is not None:
            started(bound)
        if not live:
            print(f"serving metrics on {url}")
        for i in range(settings.workers):
            tg.start_soon(work, f"w{i + 1}", settings)
        tg.start_soon(show, registry, url, live, 0.5)

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(stop_on_signal)
        if duration is not None:
            await anyio.sleep(duration)
            tg.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=6, help="pool size (default: %(default)s)")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--no-live", action="store_true", help="no live terminal view")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args(argv)
    settings = Settings(workers=args.workers)
    anyio.run(
        lambda: run_demo(
            args.host,
            args.port,
            settings=settings,
            duration=args.duration,
            live=not args.no_live,
        ),
        backend=args.backend,
    )
    print("\nstopped")


if __name__ == "__main__":
    main()
