"""examples/migrate_from_transitions.py: the migrated worker keeps the AsyncMachine log."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "migrate_from_transitions.py"


@pytest.fixture
def example() -> Iterator[types.ModuleType]:
    spec = importlib.util.spec_from_file_location("migrate_from_transitions", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_migrated_worker_keeps_the_legacy_log(example: types.ModuleType) -> None:
    before = asyncio.run(example.work(example.LegacyWorker(capacity=5)))
    after = asyncio.run(example.work(example.Worker(capacity=5)))
    assert after == before
    assert "finish failed: MachineError" in after
    assert after[-2:] == ["retired after 2 jobs", "retire: ran"]


def test_migrated_worker_counts_what_it_did(example: types.ModuleType) -> None:
    worker = example.Worker(capacity=1)
    asyncio.run(example.work(worker))
    assert worker.state == "retired"
    text = generate_latest(example.REGISTRY).decode()
    assert 'myapp_worker_state{myapp_worker_state="retired"} 1.0' in text
    # Capacity 1: the second start does not run, so neither fail nor reset do.
    assert (
        'myapp_worker_state_transitions_total{from="idle",to="running",trigger="start"} 1.0' in text
    )
    assert 'myapp_worker_state_errors_total{error="MachineError",trigger="fail"} 1.0' in text


def test_main_prints_both_logs_side_by_side(example: types.ModuleType) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        asyncio.run(example.main())
    lines = out.getvalue().splitlines()
    side_by_side = lines[: lines.index("")]
    assert len(side_by_side) == 20
    assert all("  ==  " in line for line in side_by_side)


def test_coming_from_transitions_page_prints_what_it_shows() -> None:
    """Each ```text block of the page is what the ```python block before it prints."""
    page = EXAMPLE.parent.parent / "docs" / "coming-from-transitions.md"
    fences = re.findall(r"^```(\w*)\n(.*?)^```$", page.read_text(), re.M | re.S)
    namespace: dict[str, object] = {"__name__": "coming_from_transitions"}
    printed = ""
    checked = 0
    for kind, body in fences:
        if kind == "python":
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(body, str(page), "exec"), namespace)
            printed = out.getvalue()
        elif kind == "text":
            assert printed == body
            checked += 1
    assert checked == 4
