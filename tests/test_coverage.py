"""``pytest --machine-coverage``: transition coverage, run on a small project with pytester.

The project's transitions are known: its tests run on asyncio and trio, and the counts
below are what they make. Runs with pytest-xdist start fresh worker processes, so their
totals cover the project alone; an in-process run also sees the machine classes of this
process, which is why those tests read the project's own rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Imported before any inner session: an in-process run unloads the modules first imported
# during it, and these keep process-wide state.
import hypothesis  # noqa: F401
import pytest
import trio  # noqa: F401

import statemachine_metrics.testing  # noqa: F401

pytest_plugins = ["pytester"]

MACHINES = """
from statemachine_metrics import MeteredMachine, TaskMachine


class Worker(MeteredMachine, registry=None):
    states = ["idle", "running", "error"]
    transitions = [
        ["start", "idle", "running"],
        ["finish", "running", "idle"],
        ["fail", ["idle", "running"], "error"],
        ["ping", "running", None],
        ["reset", "error", "idle"],
    ]


class Eager(Worker):
    \"\"\"Shares Worker's definition and metrics: its transitions count as Worker's.\"\"\"

    async def on_enter_running(self):
        await self.ping()


class Quiet(MeteredMachine, registry=None):
    states = ["off", "on"]
    transitions = [["switch_on", "off", "on"], ["switch_off", "on", "off"]]


class Template(MeteredMachine):
    \"\"\"No states: not a machine class of its own, not in the report.\"\"\"


class Tasks(TaskMachine, abstract=True):
    \"\"\"A template: not in the report.\"\"\"
"""

BACKENDS = """
import anyio
import pytest

from statemachine_metrics import MeteredMachine
from machines import Eager, Worker

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param
"""

TEST_ONE = (
    BACKENDS
    + """

async def test_start_and_finish():
    worker = Worker()
    await worker.start()
    await worker.finish()


async def test_a_subclass_counts_as_its_parent():
    eager = Eager()
    await eager.start()  # and ping, from on_enter_running
"""
)

TEST_TWO = (
    BACKENDS
    + """

async def test_fail_while_running():
    worker = Worker()
    await worker.start()
    await worker.fail()


def test_a_class_defined_in_a_test():
    class Local(MeteredMachine, registry=None):
        states = ["a", "b"]
        transitions = [["go", "a", "b"]]

    anyio.run(Local().go)
"""
)

# What the project's tests run: each async test twice (asyncio, trio).
EXPECTED = {
    "machines.Worker": [
        ("start", "idle", "running", 6),
        ("finish", "running", "idle", 2),
        ("fail", "idle", "error", 0),
        ("fail", "running", "error", 2),
        ("ping", "running", None, 2),
        ("reset", "error", "idle", 0),
    ],
    "machines.Quiet": [("switch_on", "off", "on", 0), ("switch_off", "on", "off", 0)],
    "test_two.test_a_class_defined_in_a_test.<locals>.Local": [("go", "a", "b", 1)],
}
# 5 of the 9 declared transitions ran.
TOTAL_PERCENT = 100 * 5 / 9

WORKER_ROWS = [
    "Worker (machines): 4 of 6 transitions ran, 66%",
    "  6  start   idle -> running",
    "  2  finish  running -> idle",
    "  0  fail    idle -> error       never ran",
    "  2  fail    running -> error",
    "  2  ping    running (internal)",
    "  0  reset   error -> idle       never ran",
]


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(machines=MACHINES, test_one=TEST_ONE, test_two=TEST_TWO)
    pytester.syspathinsert()
    return pytester


def rows(report: dict[str, Any]) -> dict[str, list[tuple[str, str, str | None, int]]]:
    """The report's classes of the project, as EXPECTED lists them."""
    found = {}
    for entry in report["classes"]:
        key = f"{entry['module']}.{entry['qualname']}"
        if entry["module"] in ("machines", "test_one", "test_two"):
            found[key] = [
                (t["trigger"], t["source"], t["dest"], t["count"]) for t in entry["transitions"]
            ]
    return found


def test_counts_every_declared_transition_of_every_class(project: pytest.Pytester) -> None:
    result = project.runpytest("--machine-coverage", "--machine-coverage-report=json:cov.json")
    result.assert_outcomes(passed=7)
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        [
            "*= machine transition coverage =*",
            "Quiet (machines): 0 of 2 transitions ran, 0%",
            "  0  switch_on   off -> on  never ran",
            "  0  switch_off  on -> off  never ran",
            *WORKER_ROWS,
            "test_a_class_defined_in_a_test.<locals>.Local (test_two): 1 of 1 transitions ran, "
            "100%",
            "  1  go  a -> b",
            "TOTAL: * of * declared transitions ran, *%",
            f"JSON report written to {project.path / 'cov.json'}",
        ]
    )
    result.stdout.no_fnmatch_line("*Template*")
    result.stdout.no_fnmatch_line("*Tasks*")
    result.stdout.no_fnmatch_line("*Eager*")
    report = json.loads((project.path / "cov.json").read_text())
    assert report["format"] == 1
    assert rows(report) == EXPECTED
    worker = next(
        e for e in report["classes"] if (e["module"], e["qualname"]) == ("machines", "Worker")
    )
    assert (worker["declared"], worker["ran"], worker["percent"]) == (6, 4, 66.67)


def test_the_workers_counts_are_added_up_under_xdist(project: pytest.Pytester) -> None:
    result = project.runpytest(
        "-p",
        "xdist",
        "-n",
        "2",
        "--dist",
        "loadfile",
        "-v",
        "--machine-coverage-report=json:cov.json",
        "--machine-coverage-fail-under=55",
    )
    result.assert_outcomes(passed=7)
    assert result.ret == pytest.ExitCode.OK  # 55.6% is not under 55
    result.stdout.no_fnmatch_line("FAIL: *")
    # Each worker ran one of the two files: the report holds both workers' counts.
    result.stdout.fnmatch_lines(["*gw0*PASSED*"])
    result.stdout.fnmatch_lines(["*gw1*PASSED*"])
    result.stdout.fnmatch_lines(
        [*WORKER_ROWS, "TOTAL: 5 of 9 declared transitions ran, 55%"], consecutive=False
    )
    report = json.loads((project.path / "cov.json").read_text())
    assert rows(report) == EXPECTED
    # Fresh worker processes: nothing else is in the report.
    assert (report["declared"], report["ran"]) == (9, 5)


def test_fail_under_fails_the_run_when_coverage_is_under_the_limit(
    project: pytest.Pytester,
) -> None:
    assert int(TOTAL_PERCENT) == 55
    result = project.runpytest_subprocess("-q", "--machine-coverage-fail-under=56")
    result.assert_outcomes(passed=7)  # every test passed: the limit sets the exit code
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "TOTAL: 5 of 9 declared transitions ran, 55%",
            "FAIL: machine transition coverage 55.6% (5 of 9 declared transitions ran) is "
            "under --machine-coverage-fail-under=56",
        ]
    )
    # -q: only the transitions that never ran are listed.
    result.stdout.no_fnmatch_line("*start*idle -> running*")
    result.stdout.fnmatch_lines(["  0  reset   error -> idle       never ran"])


def test_failing_tests_keep_their_exit_code(project: pytest.Pytester) -> None:
    project.makepyfile(test_three="def test_broken():\n    assert False\n")
    result = project.runpytest("--machine-coverage-fail-under=100")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["FAIL: machine transition coverage * is under *=100"])


def test_off_by_default_nothing_listens(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_three="""
from statemachine_metrics import MeteredMachine


def test_no_listener(request):
    assert not request.config.pluginmanager.has_plugin("statemachine_metrics_coverage")
"""
    )
    result = project.runpytest()
    result.assert_outcomes(passed=8)
    result.stdout.no_fnmatch_line("*machine transition coverage*")


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--machine-coverage-fail-under=abc", "expected a percentage from 0 to 100, got 'abc'"),
        ("--machine-coverage-fail-under=101", "expected a percentage from 0 to 100, got '101'"),
        ("--machine-coverage-report=xml:out.xml", "expected json:PATH *, got 'xml:out.xml'"),
        ("--machine-coverage-report=json:", "expected json:PATH *, got 'json:'"),
    ],
)
def test_bad_option_values_are_usage_errors(
    pytester: pytest.Pytester, option: str, message: str
) -> None:
    result = pytester.runpytest(option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{option.split('=')[0]}: {message}"])


def test_the_options_are_documented(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        [
            "machine transition coverage:",
            "  --machine-coverage *",
            "  --machine-coverage-fail-under=PCT",
            "  --machine-coverage-report=json:PATH",
        ]
    )


def test_a_report_in_a_new_directory(project: pytest.Pytester, tmp_path: Path) -> None:
    target = tmp_path / "reports" / "machines.json"
    result = project.runpytest(f"--machine-coverage-report=json:{target}")
    assert result.ret == 0
    assert rows(json.loads(target.read_text())) == EXPECTED
