"""Against the real Prometheus tools: `promtool check metrics`, and a scraping server.

Without the binaries these tests skip, unless the environment variable CI is set (CI
installs them: see .ci/run), where a missing binary is a failure.
"""

from __future__ import annotations

import contextlib
import os
import time

import anyio
import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from statemachine_metrics import Enum, MachineCollector, MachineError, MeteredMachine
from tests._prometheus import (
    INSTALL_HINT,
    cardinalities,
    check_metrics,
    find_prometheus,
    find_promtool,
    run_prometheus,
    serve_registry,
)

IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
PROMTOOL = find_promtool()
PROMETHEUS = find_prometheus()


def _missing(name: str) -> str:
    return f"{name} not found on PATH ({INSTALL_HINT}); with CI=true this fails instead"


requires_promtool = pytest.mark.skipif(PROMTOOL is None and not IN_CI, reason=_missing("promtool"))
requires_prometheus = pytest.mark.skipif(
    PROMETHEUS is None and not IN_CI, reason=_missing("prometheus")
)


def need(name: str, path: str | None) -> str:
    """The binary's path; reached without it only when CI is set, and then a failure."""
    if path is None:
        pytest.fail(f"CI is set but {name} is not on PATH ({INSTALL_HINT})")
    return path


def enum_registry() -> CollectorRegistry:
    """A registry with unlabelled and labelled Enums, with and without name prefixes."""
    registry = CollectorRegistry()
    Enum("task_state", "State of the task.", states=["a", "b", "c"], registry=registry)
    worker = Enum(
        "worker_state",
        "State of a worker.",
        labelnames=["pool"],
        namespace="myapp",
        subsystem="jobs",
        states=["idle", "running", "stopped"],
        registry=registry,
    )
    worker.labels("x").state("running")
    worker.labels(pool="y")
    Enum(
        "phase",
        "Phase of the build.",
        labelnames=["project", "branch"],
        namespace="ci",
        states=["queued", "building"],
        registry=registry,
    ).labels("p", "main").state("building")
    return registry


@requires_promtool
def test_promtool_is_clean_on_enum_metrics() -> None:
    promtool = need("promtool", PROMTOOL)
    exposition = generate_latest(enum_registry())
    result = check_metrics(exposition, promtool=promtool)
    assert result.returncode == 0, result.problems
    assert result.problems == []
    # Not vacuous: promtool read every family, with the expected number of series
    # (states times label sets); a check of an empty input would be just as silent.
    assert cardinalities(exposition, promtool=promtool) == {
        "task_state": 3,
        "myapp_jobs_worker_state": 6,
        "ci_phase": 2,
    }


@requires_promtool
def test_promtool_is_clean_on_prometheus_client_output() -> None:
    promtool = need("promtool", PROMTOOL)
    # The baseline: prometheus_client's own Enum and default collectors pass as well. A
    # fresh registry, not the global one, which other tests and the library may fill.
    registry = CollectorRegistry()
    prometheus_client.ProcessCollector(registry=registry)
    prometheus_client.PlatformCollector(registry=registry)
    prometheus_client.GCCollector(registry=registry)
    prometheus_client.Enum(
        "worker_state",
        "State of a worker.",
        ["pool"],
        states=["idle", "running"],
        registry=registry,
    ).labels("x").state("running")
    exposition = generate_latest(registry)
    assert check_metrics(exposition, promtool=promtool).problems == []
    assert {"python_info", "worker_state"} <= set(cardinalities(exposition, promtool=promtool))


@requires_promtool
def test_promtool_problems_are_reported() -> None:
    promtool = need("promtool", PROMTOOL)
    # The canary: `problems` is not empty when promtool finds something, so the clean
    # checks above mean something.
    registry = CollectorRegistry()
    Counter("no_help", "", registry=registry).inc()
    linted = check_metrics(generate_latest(registry), promtool=promtool)
    assert linted.returncode != 0
    assert any("no help text" in problem for problem in linted.problems), linted
    broken = check_metrics(b'broken{label="x" 1\n', promtool=promtool)
    assert broken.returncode != 0
    assert broken.problems, broken


def machine_registry() -> tuple[CollectorRegistry, list[MeteredMachine]]:
    """A registry exporting labelled and unlabelled machine classes, with some history."""

    class PoolWorker(
        MeteredMachine, namespace="myapp", subsystem="jobs", labelnames=("pool",), registry=None
    ):
        """State of a pool's worker."""

        states = ["idle", "running", "stopped"]
        transitions = [
            ["start", "idle", "running"],
            ["stop", "*", "stopped"],
            {"trigger": "check", "source": "running", "dest": None},
        ]

    class Fetch(MeteredMachine, namespace="myapp", registry=None):
        states = ["pending", "running", "done"]
        transitions = [["run", "pending", "running"], ["finish", "running", "done"]]

    registry = CollectorRegistry()
    registry.register(MachineCollector(PoolWorker, Fetch))
    machines: list[MeteredMachine] = [
        PoolWorker(labels={"pool": "x"}),
        PoolWorker(labels={"pool": "y"}),
    ]

    async def history() -> None:
        x, _ = machines
        await x.start()  # type: ignore[attr-defined]
        await x.check()  # type: ignore[attr-defined]
        fetch = Fetch()
        await fetch.run()  # type: ignore[attr-defined]
        with contextlib.suppress(MachineError):
            await fetch.run()  # type: ignore[attr-defined]
        machines.append(fetch)

    anyio.run(history)
    return registry, machines


@requires_promtool
def test_promtool_is_clean_on_machine_metrics() -> None:
    promtool = need("promtool", PROMTOOL)
    registry, machines = machine_registry()
    exposition = generate_latest(registry)
    result = check_metrics(exposition, promtool=promtool)
    assert result.returncode == 0, result.problems
    assert result.problems == []
    found = cardinalities(exposition, promtool=promtool)
    assert found["myapp_jobs_pool_worker_state"] == 6  # 3 states x 2 pools
    assert found["myapp_jobs_pool_worker_state_machines"] == 3
    assert found["myapp_fetch_state_errors_total"] == 1
    assert {
        "myapp_jobs_pool_worker_state_transitions_total",
        "myapp_jobs_pool_worker_state_duration_seconds",
        "myapp_fetch_state",
    } <= set(found)
    del machines


@requires_prometheus
def test_prometheus_scrapes_machine_metrics() -> None:
    prometheus = need("prometheus", PROMETHEUS)
    started = time.monotonic()
    registry, machines = machine_registry()
    x = machines[0]

    # The whole test stays well under a minute even when it fails: every wait shares one
    # deadline, and stopping the server is bounded (SIGTERM, then SIGKILL after 5 s).
    deadline = started + 40

    def left() -> float:
        return deadline - time.monotonic()

    with (
        serve_registry(registry) as target,
        run_prometheus(target, prometheus=prometheus, startup_timeout=15) as prom,
    ):
        # One scrape is committed at once, so the first non-empty answer has both pools.
        current = prom.wait_for("myapp_jobs_pool_worker_state == 1", timeout=left())
        assert {
            (s["metric"]["pool"], s["metric"]["myapp_jobs_pool_worker_state"]) for s in current
        } == {
            ("x", "running"),
            ("y", "idle"),
        }
        assert {s["metric"]["job"] for s in current} == {prom.job}
        assert {s["metric"]["instance"] for s in current} == {target}
        ran = prom.query('myapp_jobs_pool_worker_state_transitions_total{trigger="start"}')
        assert [float(s["value"][1]) for s in ran] == [1]
        (internal,) = prom.query('myapp_jobs_pool_worker_state_transitions_total{trigger="check"}')
        assert internal["metric"]["from"] == internal["metric"]["to"] == "running"
        (errors,) = prom.query("myapp_fetch_state_errors_total")
        assert errors["metric"]["error"] == "MachineError"

        # A later scrape sees the next transition, and still exactly one state at 1 per pool.
        anyio.run(x.stop)  # type: ignore[attr-defined]
        prom.wait_for(
            'myapp_jobs_pool_worker_state{pool="x"} == 1',
            until=lambda r: [s["metric"]["myapp_jobs_pool_worker_state"] for s in r] == ["stopped"],
            timeout=left(),
        )
        prom.wait_for(
            'myapp_jobs_pool_worker_state_transitions_total{from="running",trigger="stop"} == 1',
            timeout=left(),
        )
        assert len(prom.query("myapp_jobs_pool_worker_state == 1")) == 2
        counts = prom.query("myapp_jobs_pool_worker_state_machines > 0")
        assert {
            s["metric"]["myapp_jobs_pool_worker_state"]: float(s["value"][1]) for s in counts
        } == {
            "idle": 1,
            "stopped": 1,
        }

    assert prom.process.poll() is not None, "prometheus still running after the block"
    assert time.monotonic() - started < 60
    del machines
