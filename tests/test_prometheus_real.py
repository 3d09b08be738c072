"""Against the real Prometheus tools: `promtool check metrics`, and a scraping server.

Without the binaries these tests skip, unless the environment variable CI is set (CI
installs them: see .ci/run), where a missing binary is a failure.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from statemachine_metrics import Enum, MachineCollector, MachineError, MeteredMachine
from statemachine_metrics.__main__ import main as cli
from tests._prometheus import (
    IN_CI,
    INSTALL_HINT,
    cardinalities,
    check_metrics,
    check_rules,
    find_prometheus,
    find_promtool,
    run_prometheus,
    serve_registry,
    unit_test_rules,
)

ROOT = Path(__file__).resolve().parent.parent
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


# -- generated rules ---------------------------------------------------------------------------


class Uploader(MeteredMachine, name="upl", registry=None):
    """State of an uploader"""

    states = ["idle", "uploading", "failed"]
    transitions = [
        ["upload", "idle", "uploading"],
        ["done", "uploading", "idle"],
        ["fail", "uploading", "failed"],
        ["retry", "failed", "uploading"],
    ]
    stuck_after = {"uploading": 300}
    timeouts = {"failed": (30.0, "retry")}


def generated_rules(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """What ``python -m statemachine_metrics rules ARGV`` prints (it must succeed)."""
    try:
        status = cli(["rules", *argv])
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    assert (status, err) == (0, ""), err
    return out


# Imports every example in a fresh interpreter, each in the default registry's state of
# before (as the docs build does): examples are separate programs, and importing them here
# would clash with tests that import them under other module names.
EXAMPLE_RULES = """
import contextlib, io, json, pathlib, sys
from prometheus_client import REGISTRY
from statemachine_metrics import MeteredMachine
from statemachine_metrics.__main__ import main
found = {}
for path in sorted(pathlib.Path("examples").glob("*.py")):
    name = "examples." + path.stem
    before = set(REGISTRY._collector_to_names)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        status = main(["rules", name])
    if status == 0:
        found[name] = out.getvalue()
    for collector in set(REGISTRY._collector_to_names) - before:
        REGISTRY.unregister(collector)
print(json.dumps(found))
"""


def example_rules() -> dict[str, str]:
    """The rules of every example module that defines machine classes with metrics."""
    done = subprocess.run(
        [sys.executable, "-c", EXAMPLE_RULES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    found: dict[str, str] = json.loads(done.stdout)
    return found


@requires_promtool
def test_promtool_checks_generated_rules(capsys: pytest.CaptureFixture[str]) -> None:
    promtool = need("promtool", PROMTOOL)
    module = sys.modules[__name__].__name__
    outputs = [
        generated_rules([f"{module}:Uploader"], capsys),
        generated_rules(
            [f"{module}:Uploader", "--for", "5m", "--window", "1h30m", "--label", "severity=page"],
            capsys,
        ),
    ]
    examples = example_rules()
    assert {"examples.demo", "examples.stuck_worker"} <= set(examples)
    outputs.extend(examples.values())
    for rules in outputs:
        result = check_rules(rules, promtool=promtool)
        assert result.returncode == 0, (result.problems, rules)
        # Not vacuous: promtool counted every rule of the file.
        assert f"SUCCESS: {rules.count('- record: ') + rules.count('- alert: ')} rules found" in (
            result.stdout
        ), result.stdout


@requires_promtool
def test_promtool_rejects_a_broken_rule_file() -> None:
    # The canary: the check above would see a rule file that Prometheus refuses.
    promtool = need("promtool", PROMTOOL)
    broken = "groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: sum(\n"
    assert check_rules(broken, promtool=promtool).returncode != 0


# promtool's unit tests: input series for one instance, then what each alert shows when.
# Series grow by 60 every minute, as the age of a machine that never leaves its state does.
# The machine entered `uploading` at 0: UploaderStuck fires past 5 minutes, not before.
STUCK_TESTS = """\
      - eval_time: 4m
        alertname: UploaderStuck
        exp_alerts: []
      - eval_time: 6m
        alertname: UploaderStuck
        exp_alerts:
          - exp_labels:
              state: uploading
              upl: uploading
              job: app
              instance: a:1
            exp_annotations:
              summary: A Uploader machine is stuck in state uploading
              description: A Uploader machine on a:1 has been in state uploading for 6m 0s,
                longer than its limit of 5m (Uploader.stuck_after).
"""

RULE_TESTS = """\
rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'upl_oldest_seconds{upl="uploading", job="app", instance="a:1"}'
        values: '0+60x10'
      - series: 'upl_oldest_seconds{upl="failed", job="app", instance="a:1"}'
        values: '0+60x10'
      - series: 'upl_oldest_seconds{upl="idle", job="app", instance="a:1"}'
        values: '0+60x10'
      - series: 'upl_errors_total{trigger="upload", error="OSError", job="app", instance="a:1"}'
        values: '0+6x10'
      - series: 'upl_trigger_duration_seconds_count{trigger="upload", job="app", instance="a:1"}'
        values: '0+60x10'
      - series: 'upl_errors_total{trigger="done", error="ValueError", job="app", instance="a:1"}'
        values: '0+1x10'
      - series: 'upl_trigger_duration_seconds_count{trigger="done", job="app", instance="a:1"}'
        values: '0+60x10'
    alert_rule_test:
@STUCK@      - eval_time: 1m
        alertname: UploaderTimeoutNotFired
        exp_alerts: []
      - eval_time: 2m
        alertname: UploaderTimeoutNotFired
        exp_alerts:
          - exp_labels:
              state: failed
              trigger: retry
              upl: failed
              job: app
              instance: a:1
            exp_annotations:
              summary: A Uploader timeout did not move a machine out of state failed
              description: A Uploader machine on a:1 has been in state failed for 2m 0s,
                though its timeout fires retry after 30s. Timers run only while the machine
                is entered (async with), and a trigger that raises or whose condition fails
                leaves the machine where it is.
      - eval_time: 8m
        alertname: UploaderErrors
        exp_alerts:
          - exp_labels:
              trigger: upload
              job: app
            exp_annotations:
              summary: Uploader trigger upload raises
              description: 10% of the calls of Uploader trigger upload in job app raised over
                the last 5m (the limit is 5%); upl_errors_total has the exception classes.
    promql_expr_test:
      - expr: job:upl_errors:rate5m
        eval_time: 8m
        exp_samples:
          - labels: 'job:upl_errors:rate5m{trigger="upload", error="OSError", job="app"}'
            value: 0.1
          - labels: 'job:upl_errors:rate5m{trigger="done", error="ValueError", job="app"}'
            value: 0.016666666666666666
""".replace("@STUCK@", STUCK_TESTS)


@requires_promtool
def test_promtool_unit_tests_of_generated_alerts(capsys: pytest.CaptureFixture[str]) -> None:
    promtool = need("promtool", PROMTOOL)
    rules = generated_rules([f"{__name__}:Uploader"], capsys)
    result = unit_test_rules(rules, RULE_TESTS, promtool=promtool)
    assert result.returncode == 0, result.problems
    assert "SUCCESS" in result.stdout, result.stdout
    # The canary: the same tests fail against rules whose limit is not the class's.
    wrong = rules.replace("> 300", "> 900")
    assert wrong != rules
    failed = unit_test_rules(wrong, RULE_TESTS, promtool=promtool)
    assert failed.returncode != 0
    assert "UploaderStuck" in failed.stdout + failed.stderr


# In multiprocess mode the stay's age comes from the entry timestamp: the machine entered
# `uploading` at time 0 and stays there.
RULE_TESTS_MULTIPROCESS = """\
rule_files: [rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'upl_oldest_timestamp_seconds{upl="uploading", job="app", instance="a:1"}'
        values: '0x10'
      - series: 'upl_oldest_timestamp_seconds{upl="idle", job="app", instance="a:1"}'
        values: 'Inf Inf Inf Inf Inf Inf Inf Inf'
    alert_rule_test:
@STUCK@""".replace("@STUCK@", STUCK_TESTS)


@requires_promtool
def test_promtool_unit_tests_of_generated_alerts_in_multiprocess_mode(
    capsys: pytest.CaptureFixture[str],
) -> None:
    promtool = need("promtool", PROMTOOL)
    rules = generated_rules([f"{__name__}:Uploader", "--multiprocess"], capsys)
    assert "_oldest_timestamp_seconds" in rules
    assert "_oldest_seconds{" not in rules
    assert check_rules(rules, promtool=promtool).returncode == 0
    result = unit_test_rules(rules, RULE_TESTS_MULTIPROCESS, promtool=promtool)
    assert result.returncode == 0, result.problems
    # The canary: the single-process rules read a gauge these series do not have.
    single = generated_rules([f"{__name__}:Uploader"], capsys)
    assert unit_test_rules(single, RULE_TESTS_MULTIPROCESS, promtool=promtool).returncode != 0


@requires_prometheus
def test_prometheus_fires_the_generated_stuck_alert(capsys: pytest.CaptureFixture[str]) -> None:
    """A real Prometheus loads the generated rules, scrapes an app with a stuck machine
    and fires <Class>Stuck for it, and only for it."""
    prometheus = need("prometheus", PROMETHEUS)
    started = time.monotonic()

    class Transfer(MeteredMachine, namespace="real", labelnames=("peer",), registry=None):
        states = ["idle", "sending", "done"]
        transitions = [["send", "idle", "sending"], ["finish", "sending", "done"]]
        stuck_after = {"sending": 0.5, "idle": 3600}

    module = type(sys)("real_alerting_app")
    module.Transfer = Transfer  # type: ignore[attr-defined]
    Transfer.__module__ = module.__name__
    sys.modules[module.__name__] = module
    try:
        rules = generated_rules([f"{module.__name__}:Transfer"], capsys)
    finally:
        del sys.modules[module.__name__]
    registry = CollectorRegistry()
    registry.register(MachineCollector(Transfer))
    stuck, waiting = Transfer(labels={"peer": "a"}), Transfer(labels={"peer": "b"})
    anyio.run(stuck.send)  # type: ignore[attr-defined]

    with (
        serve_registry(registry) as target,
        run_prometheus(target, prometheus=prometheus, startup_timeout=15, rules=rules) as prom,
    ):
        deadline = started + 40

        def firing() -> list[dict[str, Any]]:
            return [
                a
                for a in prom.alerts()
                if a["labels"]["alertname"] == "TransferStuck" and a["state"] == "firing"
            ]

        while not firing():
            assert time.monotonic() < deadline, (
                f"TransferStuck never fired; alerts: {prom.alerts()}; "
                f"rules: {prom.rule_health()}\n{prom.log_tail()}"
            )
            time.sleep(0.2)
        (alert,) = firing()
        assert alert["labels"]["state"] == "sending"
        assert alert["labels"]["real_transfer_state"] == "sending"
        assert alert["labels"]["instance"] == target
        assert float(alert["value"]) > 0.5
        assert "longer than its limit of 500ms" in alert["annotations"]["description"]
        assert all(rule["health"] == "ok" for rule in prom.rule_health()), prom.rule_health()
        # The idle machine's limit is an hour: nothing fires for it.
        assert {a["labels"]["state"] for a in prom.alerts()} == {"sending"}
    assert time.monotonic() - started < 60
    del stuck, waiting
