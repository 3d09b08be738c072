"""The demo (``make demo``) runs, serves its metrics and moves its machines."""

from __future__ import annotations

import random
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
    assert "serving metrics on http://127.0.0.1:" in capsys.readouterr().out
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
    assert total("demo_job_state_transitions_total", trigger="succeed") > 0
    assert total("demo_job_state_transitions_total", trigger="fail") > 0
    assert total("demo_worker_state_transitions_total", trigger="fail") > 0
    # A failed worker rests in error; its timeout brought some back after a second.
    assert total("demo_worker_state_transitions_total", trigger="recover") > 0


def test_view_renders_counts_and_rate() -> None:
    view = demo.render({"demo_worker_state": {"idle": 2.0, "running": 1.0}}, 3.5, "http://x")
    from rich.console import Console

    console = Console(width=100, record=True)
    console.print(view)
    text = console.export_text()
    for shown in ("idle", "running", "3.5"):
        assert shown in text
