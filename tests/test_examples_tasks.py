"""The examples of track, TaskMachine and timeouts run, quickly, and do what they say."""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import anyio
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.anyio


@cache
def example(name: str) -> ModuleType:
    """Import examples/<name>.py once (its machine classes are defined at import)."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def test_track_job(capsys: pytest.CaptureFixture[str]) -> None:
    track_job = example("track_job")
    with anyio.fail_after(1):
        text = await track_job.main(jobs=10, workers=2, pause=0.005)
    failed = capsys.readouterr().out.splitlines()
    assert sorted(line.split(": ", 1)[1] for line in failed) == ["job 4 failed", "job 9 failed"]
    assert 'myapp_worker_state_transitions_total{from="running",to="error",trigger="fail"}' in text
    samples = track_job.REGISTRY.get_sample_value
    total = samples(
        "myapp_worker_state_transitions_total",
        {"from": "idle", "to": "running", "trigger": "start"},
    )
    failures = samples(
        "myapp_worker_state_transitions_total",
        {"from": "running", "to": "error", "trigger": "fail"},
    )
    resets = samples(
        "myapp_worker_state_transitions_total", {"from": "error", "to": "idle", "trigger": "reset"}
    )
    # Cumulative over the runs of this test (one per backend): 10 jobs, 2 failures each.
    assert total is not None
    assert total % 10 == 0
    assert failures == resets == total / 5
    # Every worker was closed: no machine is left in any state.
    for state in ("idle", "running", "error"):
        assert samples("myapp_worker_state_machines", {"myapp_worker_state": state}) == 0


async def test_meter_coroutines() -> None:
    meter = example("meter_coroutines")
    before = meter.outcomes()
    with anyio.fail_after(1):
        results = await meter.main(calls=30, delay=0.02)
    assert results == {"succeeded": 20, "failed": 6, "cancelled": 4}
    after = meter.outcomes()
    assert {state: after[state] - before[state] for state in after} == results
    running = meter.REGISTRY.get_sample_value(
        "myapp_fetch_state_machines", {"myapp_fetch_state": "running"}
    )
    assert running == 0


async def test_state_timeout() -> None:
    state_timeout = example("state_timeout")
    with anyio.fail_after(1):
        path = await state_timeout.main()
    attempt = ["connecting", "failed", "disconnected"]
    assert path == [
        "disconnected",
        *attempt,
        *attempt,
        "connecting",
        "connected",
        "connected",
        "connected",
        "connected",
        "disconnected",
    ]
