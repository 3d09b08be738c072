"""The pytest plugin, run in inner pytest sessions (in-process) with `pytester`."""

from __future__ import annotations

from pathlib import Path

# Imported before any inner session: an in-process run unloads the modules first imported
# during it, and these keep process-wide state (machine classes, the event loop) or take
# long to import again (hypothesis' plugin imports it at the end of every session).
import hypothesis  # noqa: F401
import pytest
import trio  # noqa: F401

import statemachine_metrics.testing

pytest_plugins = ["pytester"]

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "test_worker_example.py"

# The top of every inner test file: its own backends, and a machine class.
HEADER = """
import pytest
from statemachine_metrics import MeteredMachine

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


class Worker(MeteredMachine, registry=None):
    states = ["idle", "running", "error"]
    transitions = [
        ["start", "idle", "running"],
        ["finish", "running", "idle"],
        ["fail", ["idle", "running"], "error"],
    ]


alive = []  # machines kept alive across tests


def recording():
    return any(
        fn.__module__ == "statemachine_metrics.testing" for fn in MeteredMachine._own_listeners
    )
"""

# Each test of the first group starts one more machine and keeps it alive; the second
# reads the counters then.
ISOLATION = (
    HEADER
    + """
async def test_first(machine_metrics):
    worker = Worker()
    alive.append(worker)
    await worker.start()
    assert machine_metrics.transitions(Worker) == 1


{marker}
async def test_second(machine_metrics):
    assert machine_metrics.transitions(Worker) == {transitions}
    assert machine_metrics.value(Worker, "duration_seconds_count") == {transitions}
    assert machine_metrics.count(Worker, "running") == 2  # live: never reset
"""
)


def test_the_fixtures_need_no_conftest(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        HEADER
        + """
async def test_fixtures(machine_recorder, machine_metrics):
    worker = Worker()
    await worker.start()
    machine_recorder.assert_path(worker, ["idle", "running"])
    assert machine_recorder.recording
    assert machine_metrics.state(Worker) == "running"
    assert machine_metrics.transitions(Worker, "start") == 1
"""
    )
    result = pytester.runpytest("-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_fixtures?asyncio? PASSED*", "*test_fixtures?trio? PASSED*"])


def test_metrics_are_reset_before_each_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(ISOLATION.format(marker="", transitions=0))
    pytester.runpytest().assert_outcomes(passed=4)


def test_the_keep_marker_keeps_the_previous_tests_counts(pytester: pytest.Pytester) -> None:
    # test_first ran on asyncio, then on trio after a reset: 1 transition stays.
    pytester.makepyfile(ISOLATION.format(marker="@pytest.mark.keep_machine_metrics", transitions=1))
    pytester.runpytest("--strict-markers").assert_outcomes(passed=4)


def test_the_reset_runs_after_wider_fixtures_and_before_the_tests_own(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
import anyio
import pytest
from statemachine_metrics import MeteredMachine


class Worker(MeteredMachine, registry=None):
    states = ["idle", "running"]
    transitions = [["start", "idle", "running"]]


@pytest.fixture(scope="module")
def module_worker():
    worker = Worker()
    anyio.run(worker.start)
    return worker


@pytest.fixture
def function_worker():
    worker = Worker()
    anyio.run(worker.start)
    return worker


def test_scopes(module_worker, function_worker, machine_metrics):
    assert machine_metrics.transitions(Worker) == 1  # the function-scoped fixture's
    assert machine_metrics.count(Worker, "running") == 2
"""
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_the_ini_option_turns_the_reset_off(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nreset_machine_metrics = false\n")
    pytester.makepyfile(
        HEADER
        + """
async def test_first(machine_metrics, anyio_backend):
    worker = Worker()
    alive.append(worker)
    await worker.start()
    assert machine_metrics.transitions(Worker) == len(alive)
"""
    )
    pytester.runpytest().assert_outcomes(passed=2)


def test_the_marker_and_the_ini_option_are_documented(pytester: pytest.Pytester) -> None:
    markers = pytester.runpytest("--markers")
    markers.stdout.fnmatch_lines(["@pytest.mark.keep_machine_metrics: *do not zero*"])
    help_ = pytester.runpytest("--help")
    help_.stdout.fnmatch_lines(["*reset_machine_metrics (bool):*", "*zero machine counters*"])


def test_the_recorder_fixture_stops_with_its_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        HEADER
        + """
seen = []


async def test_record(machine_recorder):
    assert recording()
    seen.append(machine_recorder)
    worker = Worker()
    alive.append(worker)
    await worker.start()


def test_after():
    assert not recording()
    assert [r.recording for r in seen] == [False, False]
    assert [len(r.transitions) for r in seen] == [1, 1]  # each its own test's
"""
    )
    pytester.runpytest().assert_outcomes(passed=3)


def test_an_assertion_failure_reads_well_in_the_report(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        HEADER
        + """
async def test_wrong_path(machine_recorder):
    worker = Worker()
    await worker.start()
    await worker.fail()
    machine_recorder.assert_path(worker, ["idle", "running", "idle"])
"""
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            '*machine_recorder.assert_path(worker, ?"idle", "running", "idle"?)',
            "E*AssertionError: unexpected path of <Worker state='error'>",
            "E*  expected: idle -> running -> idle",
            "E*  actual:   idle -> running -> error",
            "E*            *^^^^^",
            "E*first difference at index 2: expected 'idle', got 'error'",
            "E*recorded transitions of it:",
            "E*  1. start: idle -> running",
            "E*  2. fail: running -> error",
        ]
    )
    # The helper's own frame is hidden: the report points at the test's line.
    result.stdout.no_fnmatch_line("*statemachine_metrics?testing.py*")


def test_the_plugin_can_be_disabled(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(HEADER + "\nasync def test_fixture(machine_recorder):\n    pass\n")
    result = pytester.runpytest("-p", "no:statemachine_metrics")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*fixture 'machine_recorder' not found*"])


def test_the_example_suite_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_worker_example=EXAMPLE.read_text())
    result = pytester.runpytest("--strict-markers", "-W", "error")
    result.assert_outcomes(passed=8)
    assert statemachine_metrics.testing._active == ()


def test_a_metrics_error_shows_the_tests_line_not_the_library(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        HEADER
        + """
def test_typo(machine_metrics):
    machine_metrics.count(Worker, "runing")
"""
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            '>*machine_metrics.count(Worker, "runing")',
            "E*ValueError: value(): 'runing' is not a state of Worker; its states are idle, "
            "running, error",
        ]
    )
    result.stdout.no_fnmatch_line("*statemachine_metrics?testing.py*")


RULE_BASED_EXAMPLE = EXAMPLE.parent / "test_rule_based_example.py"
DOCS_PAGE = EXAMPLE.parent.parent / "docs" / "testing.md"


def test_the_rule_based_example_suite_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_rule_based_example=RULE_BASED_EXAMPLE.read_text())
    result = pytester.runpytest("-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*TestWorkerOnAsyncio::runTest PASSED*"])
    result.stdout.fnmatch_lines(["*TestWorkerOnTrio::runTest PASSED*"])


def test_the_coverage_table_in_the_docs_is_what_the_example_prints(
    pytester: pytest.Pytester,
) -> None:
    page = DOCS_PAGE.read_text()
    start = page.index("Worker (test_worker_example)")
    shown = page[start : page.index("TOTAL:", start)].splitlines()
    assert len(shown) == 6
    pytester.makepyfile(test_worker_example=EXAMPLE.read_text())
    result = pytester.runpytest("--machine-coverage")
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(shown, consecutive=True)
