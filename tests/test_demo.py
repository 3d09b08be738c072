"""The demo (``make demo``) runs, serves its metrics and moves its machines."""

from __future__ import annotations

import random
import socket
import sys
import urllib.request
from pathlib import Path

import anyio
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from statemachine_metrics import MachineCollector

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import demo

pytestmark = pytest.mark.anyio


async def test_demo_serves_metrics_of_a_busy_pool(capsys: pytest.CaptureFixture[str]) -> None:
    registry = CollectorRegistry()
    registry.register(MachineCollector(demo.Worker, demo.Job))
    settings = demo.Settings(
        workers=4,
        job_seconds=(0.01, 0.03),
        pause_seconds=(0.0, 0.01),
        failure_rate=0.4,
        rng=random.Random(7),
    )
    ports: list[int] = []
    bodies: list[str] = []
    serving = anyio.Event()

    def started(port: int) -> None:
        ports.append(port)
        serving.set()

    async def scrape_late() -> None:
        await serving.wait()
        await anyio.sleep(1.4)
        url = f"http://127.0.0.1:{ports[0]}/metrics"
        body = await anyio.to_thread.run_sync(lambda: urllib.request.urlopen(url, timeout=5).read())
        bodies.append(body.decode())

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(scrape_late)
            await demo.run_demo(
                port=0,
                settings=settings,
                duration=1.6,
                live=False,
                registry=registry,
                started=started,
            )
    printed = capsys.readouterr().out
    assert "serving metrics on http://127.0.0.1:" in printed
    assert "python -m statemachine_metrics rules examples.demo" in printed
    (body,) = bodies
    values = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }

    def total(name: str, **labels: str) -> float:
        return sum(
            value
            for (sample, pairs), value in values.items()
            if sample == name and set(labels.items()) <= set(pairs)
        )

    assert total("demo_worker_state_machines") == 4
    assert total("demo_worker_state", worker="w1") == 1
    # Jobs share one series: no label but the state's, so nothing suggests one per job.
    job_series = {pairs for (sample, pairs), _ in values.items() if sample == "demo_job_state"}
    assert {tuple(label for label, _ in pairs) for pairs in job_series} == {("demo_job_state",)}
    assert total("demo_job_state_transitions_total", trigger="succeed") > 0
    assert total("demo_job_state_transitions_total", trigger="fail") > 0
    assert total("demo_worker_state_transitions_total", trigger="fail") > 0
    # A failed worker rests in error; its timeout brought some back after a second.
    assert total("demo_worker_state_transitions_total", trigger="recover") > 0
    # The view's finished totals are the counters' transitions into each state.
    view = demo.snapshot(registry)
    for state, trigger in (("succeeded", "succeed"), ("failed", "fail")):
        labels = {"from": "running", "to": state, "trigger": trigger}
        counted = registry.get_sample_value("demo_job_state_transitions_total", labels)
        assert view.entered["demo_job_state"][state] == counted
        assert counted


def rendered(view: object) -> str:
    from rich.console import Console

    console = Console(width=100, record=True)
    console.print(view)
    return console.export_text()


def test_view_shows_live_machines_and_finished_jobs() -> None:
    view = demo.Snapshot(
        live={
            "demo_worker_state": {"idle": 2.0, "running": 1.0, "error": 0.0},
            "demo_job_state": {
                "pending": 0.0,
                "running": 2.0,
                "succeeded": 0.0,
                "failed": 0.0,
                "cancelled": 0.0,
            },
        },
        entered={
            "demo_worker_state": {"idle": 40.0, "running": 41.0, "error": 3.0},
            "demo_job_state": {
                "pending": 0.0,
                "running": 41.0,
                "succeeded": 37.0,
                "failed": 3.0,
                "cancelled": 0.0,
            },
        },
        transitions=165.0,
    )
    lines = {
        tuple(cell for cell in line.replace("│", " ").split())
        for line in rendered(demo.render(view, 3.5, "http://x")).splitlines()
    }
    # Workers: live counts. Jobs: live while they run, then finished totals from the counters
    # (a finished job is closed at once, so its live count would always be 0).
    assert {("demo_worker_state", "idle", "2"), ("running", "1"), ("error", "0")} <= lines
    assert {("demo_job_state", "pending", "0"), ("running", "2"), ("succeeded", "37")} <= lines
    assert {("failed", "3"), ("cancelled", "0"), ("transitions/s", "3.5")} <= lines


def test_a_taken_port_is_one_line_and_a_way_out(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exited:
            demo.main(["--port", str(port), "--duration", "5", "--no-live"])
    (message,) = str(exited.value.code).splitlines()
    assert message == (
        f"demo: port {port} on 127.0.0.1 is taken; choose another with "
        f"`make demo PORT={port + 1}` or `python examples/demo.py --port {port + 1}`"
    )
    assert capsys.readouterr().err == ""
