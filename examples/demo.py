"""A worker pool you can watch: machines with labels, metered jobs, a state timeout.

Run with ``make demo`` (or ``python examples/demo.py --help``). Metrics are served on
http://127.0.0.1:8000/metrics (``--port`` to choose another) while the terminal shows how
many machines are in each state and how fast they move. Ctrl-C stops it cleanly.

Two kinds of machines, read two ways. A worker is one machine per label value
(``worker="w1"``), so its `Enum` series, ``demo_worker_state{worker="w1"}``, is that
worker's state. Jobs are many at once and short-lived, so they share one unlabelled
series, which shows only the last transition of any job: read jobs through
``demo_job_state_machines`` (how many are in each state now) and
``demo_job_state_transitions_total`` (how many finished, and how).
"""

from __future__ import annotations

import argparse
import errno
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
from prometheus_client import REGISTRY, CollectorRegistry

from statemachine_metrics import MeteredMachine, TaskMachine, serve_metrics

#: Where the alerts and dashboards for these machines come from.
RULES = (
    "alert rules for these machines: python -m statemachine_metrics rules examples.demo "
    "(a Grafana dashboard: dashboard examples.demo; see docs/alerts-and-dashboards.md)"
)


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


class Job(TaskMachine, namespace="demo"):
    """State of a job"""


CLASSES: tuple[type[MeteredMachine], ...] = (Worker, Job)


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


def make_job(settings: Settings) -> Callable[[str], Awaitable[None]]:
    @Job.task
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
                    await job(settings.rng.choice(settings.kinds))
            except JobFailed:
                pass
            await anyio.sleep(settings.rng.uniform(*settings.pause_seconds))


@dataclass
class Snapshot:
    """What the terminal view shows, read from the registry as a scrape would."""

    live: dict[str, dict[str, float]]  # Enum name -> state -> live machines now
    entered: dict[str, dict[str, float]]  # Enum name -> state -> transitions into it so far
    transitions: float  # every transition of the demo's classes so far


def snapshot(registry: CollectorRegistry) -> Snapshot:
    """Live machines per state and transitions into each state, for each class."""
    names = {cls.metric_names()[0]: cls for cls in CLASSES}
    live: dict[str, dict[str, float]] = {}
    entered: dict[str, dict[str, float]] = {}
    for family in registry.collect():
        enum = family.name.removesuffix("_machines")
        if family.name.endswith("_machines") and enum in names:
            live[enum] = {s.labels[enum]: s.value for s in family.samples}
        enum = family.name.removesuffix("_transitions")
        if family.name.endswith("_transitions") and enum in names:
            into = entered.setdefault(enum, dict.fromkeys(names[enum].state_names(), 0.0))
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    into[sample.labels["to"]] += sample.value
    total = sum(sum(states.values()) for states in entered.values())
    return Snapshot(live, entered, total)


def render(view: Snapshot, rate: float, url: str) -> object:
    """A table of machines per state: live counts, and finished totals for final states.

    A job is closed as soon as it ends, so no live machine ever rests in a final state:
    for those the view shows how many jobs ended there, from the transitions counter.
    """
    finals = {cls.metric_names()[0]: final_states(cls) for cls in CLASSES}
    rows: list[tuple[str, str, float | None, float | None]] = [
        (name, state, None, view.entered.get(name, {}).get(state, 0.0))
        if state in finals.get(name, ())
        else (name, state, value, None)
        for name, states in view.live.items()
        for state, value in states.items()
    ]
    try:
        from rich.table import Table
    except ImportError:  # the plain view, without the demo extra
        return (
            " | ".join(
                f"{name} {state}="
                + (f"{int(live)}" if live is not None else f"{int(done or 0)} done")
                for name, state, live, done in rows
            )
            + f" | {rate:.1f} transitions/s"
        )
    table = Table(title=f"statemachine_metrics demo — {url}", caption=f"{RULES}\nCtrl-C stops")
    table.add_column("machine")
    table.add_column("state")
    table.add_column("live", justify="right")
    table.add_column("finished", justify="right")
    shown = ""
    for name, state, live, done in rows:
        table.add_row(
            name if name != shown else "",
            state,
            "" if live is None else str(int(live)),
            "" if done is None else str(int(done)),
        )
        shown = name
    table.add_row("", "transitions/s", f"{rate:.1f}", "")
    return table


def final_states(cls: type[MeteredMachine]) -> frozenset[str]:
    """States no transition leaves (a task's outcomes)."""
    table = cls.transition_table()
    return frozenset(cls.state_names()) - {t.source for t in table if t.dest != t.source}


async def show(registry: CollectorRegistry, url: str, live: bool, period: float) -> None:
    """Refresh the terminal view every `period` seconds."""
    last_total, last_time = snapshot(registry).transitions, time.monotonic()
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
            current = snapshot(registry)
            now = time.monotonic()
            rate = (current.transitions - last_total) / (now - last_time)
            last_total, last_time = current.transitions, now
            view = render(current, rate, url)
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
            print(RULES)
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
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
    try:
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
    except Exception as exc:
        if not _address_in_use(exc):
            raise
        other = args.port + 1 if 0 < args.port < 65535 else 8001
        sys.exit(
            f"demo: port {args.port} on {args.host} is taken; choose another with "
            f"`make demo PORT={other}` or `python examples/demo.py --port {other}`"
        )
    print("\nstopped")


def _address_in_use(exc: BaseException) -> bool:
    """Whether `exc` is, or groups, the error of binding a port already taken."""
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return True
    return any(_address_in_use(inner) for inner in getattr(exc, "exceptions", ()))


if __name__ == "__main__":
    main()
