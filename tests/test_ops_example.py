"""examples/stuck_worker.py: a stuck machine, its age on /metrics, and its alert."""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

import anyio
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from statemachine_metrics.__main__ import main as cli

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples import stuck_worker

pytestmark = pytest.mark.anyio


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_the_stuck_upload_ages_on_metrics(anyio_backend: str) -> None:
    ports: list[int] = []
    seen: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    serving = anyio.Event()

    def started(port: int) -> None:
        ports.append(port)
        serving.set()

    async def watch() -> None:
        await serving.wait()
        await anyio.sleep(0.5)
        seen.update(await anyio.to_thread.run_sync(scrape, ports[0]))

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await stuck_worker.run(port=0, seconds=0.7, started=started)

    label = "shop_upload_state"
    assert seen[(label, ((label, "uploading"), ("uploader", "u0")))] == 1.0
    age = seen[(f"{label}_oldest_seconds", ((label, "uploading"),))]
    assert 0.45 <= age < 5
    assert seen[(f"{label}_machines", ((label, "uploading"),))] >= 1


def test_the_rules_alert_on_the_stuck_state(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["rules", "examples.stuck_worker"]) == 0
    (group,) = yaml.safe_load(capsys.readouterr().out)["groups"]
    alerts = {rule["alert"]: rule for rule in group["rules"] if "alert" in rule}
    assert alerts["UploadStuck"]["expr"] == (
        'shop_upload_state_oldest_seconds{shop_upload_state="uploading"} > 600'
    )
    assert alerts["UploadTimeoutNotFired"]["labels"] == {"state": "failed", "trigger": "retry"}


def test_the_command_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = stuck_worker.run

    async def briefly(port: int, uploaders: int, seconds: float | None, started: object) -> None:
        await run(0, uploaders, 0.05, started)  # type: ignore[arg-type]

    monkeypatch.setattr(stuck_worker, "run", briefly)
    stuck_worker.main(["--port", "0"])
    out = capsys.readouterr().out
    assert out.startswith("serving http://127.0.0.1:")
    assert "uploader u0 is stuck" in out
