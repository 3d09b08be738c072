"""The pytest plugin: machine fixtures, and machine metrics isolated between tests.

Loaded through the ``pytest11`` entry point wherever the package is installed; no conftest
needed (``-p no:statemachine_metrics`` turns it off). It gives:

- ``machine_recorder``: a `statemachine_metrics.testing.Recorder` of every machine,
  active for the whole test;
- ``machine_metrics``: a `statemachine_metrics.testing.MachineMetrics`, to read a
  class's samples by short name;
- before each test, counters and histograms of every machine class are zeroed, so that
  one test's transitions never show up in the next. Opt out for one test, a module
  (``pytestmark``) or a class with ``@pytest.mark.keep_machine_metrics``, or for the
  whole run with the ini option ``reset_machine_metrics = false``;
- ``--machine-coverage``: at the end of the run, each machine class's declared
  transitions with how often each ran, and those that never ran;
  ``--machine-coverage-fail-under=PCT`` fails the run when fewer than PCT percent of
  them ran, ``--machine-coverage-report=json:PATH`` writes the report as JSON (both imply
  ``--machine-coverage``). Under pytest-xdist, the workers' counts are added up.

The package is imported lazily: a session that never imports it pays nothing, and
without ``--machine-coverage`` nothing listens to transitions.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ._coverage import TransitionCoverage
    from .testing import MachineMetrics, Recorder

__all__ = ["machine_metrics", "machine_recorder"]

_MARKER = "keep_machine_metrics"
_INI = "reset_machine_metrics"
_COVERAGE = "statemachine_metrics_coverage"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("statemachine_metrics", "machine transition coverage")
    group.addoption(
        "--machine-coverage",
        action="store_true",
        default=False,
        help="report how often each declared transition of each machine class ran, and "
        "those that never ran",
    )
    group.addoption(
        "--machine-coverage-fail-under",
        metavar="PCT",
        type=_percent,
        default=None,
        help="fail the run when fewer than PCT percent of the declared machine transitions "
        "ran (implies --machine-coverage)",
    )
    group.addoption(
        "--machine-coverage-report",
        metavar="json:PATH",
        type=_report_path,
        default=None,
        help="also write the machine coverage report as JSON to PATH (implies --machine-coverage)",
    )
    parser.addini(
        _INI,
        type="bool",
        default=True,
        help="statemachine_metrics: zero machine counters and histograms before each test "
        "(default: true)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{_MARKER}: statemachine_metrics: do not zero machine counters and histograms "
        "before this test",
    )
    option = config.option
    if option.machine_coverage or option.machine_coverage_fail_under is not None:
        option.machine_coverage = True
    if option.machine_coverage_report is not None:
        option.machine_coverage = True
    if option.machine_coverage:
        config.pluginmanager.register(_CoveragePlugin(config), _COVERAGE)


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"expected a percentage from 0 to 100, got {text!r}")
    return value


def _report_path(text: str) -> Path:
    kind, _, path = text.partition(":")
    if kind != "json" or not path:
        raise argparse.ArgumentTypeError(f"expected json:PATH (the only format), got {text!r}")
    return Path(path)


@pytest.fixture(autouse=True)
def _reset_machine_metrics(request: pytest.FixtureRequest) -> None:
    """Zero every machine class's counters and histograms before the test."""
    # No machine class can exist before the package is imported: nothing to reset.
    if "statemachine_metrics._collector" not in sys.modules:
        return
    if request.node.get_closest_marker(_MARKER) is not None:
        return
    if not request.config.getini(_INI):
        return
    from .testing import reset_metrics

    reset_metrics()


@pytest.fixture
def machine_recorder() -> Iterator[Recorder]:
    """A recorder of every machine's transitions during the test (see `testing.record`)."""
    from .testing import record

    with record() as recorder:
        yield recorder


@pytest.fixture
def machine_metrics() -> MachineMetrics:
    """Reads machine metric samples by class and short name (see `testing.MachineMetrics`)."""
    from .testing import MachineMetrics

    return MachineMetrics()


class _CoveragePlugin:
    """``--machine-coverage``: counts transitions during the session, reports at the end.

    Under pytest-xdist each worker counts its own tests and hands its counts to the
    controller, which adds them up, reports, and applies the fail-under limit.
    """

    def __init__(self, config: pytest.Config) -> None:
        from ._coverage import TransitionCoverage

        self.config = config
        self.coverage: TransitionCoverage = TransitionCoverage()
        self.worker = hasattr(config, "workerinput")
        self.controller = False
        self.failed: str | None = None
        self.written: Path | None = None

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        # xdist's controller runs no tests: it only adds up what its workers send.
        self.controller = self.config.pluginmanager.has_plugin("dsession")
        if not self.controller:
            self.coverage.start()

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if not self.controller:
            self.coverage.scan()  # the classes of the test modules, run or not

    def pytest_runtest_logfinish(self, nodeid: str, location: Any) -> None:
        if not self.controller:
            self.coverage.scan()  # classes defined inside the test

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        data = getattr(node, "workeroutput", {}).get(_COVERAGE)
        if data is not None:
            self.coverage.merge(data)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not self.controller:
            self.coverage.scan()
            self.coverage.stop()
        if self.worker:
            self.config.workeroutput[_COVERAGE] = self.coverage.as_json()  # type: ignore[attr-defined]
            return
        option = self.config.option
        path: Path | None = option.machine_coverage_report
        if path is not None:
            self.written = self.config.invocation_params.dir / path
            self.coverage.write_json(self.written)
        limit: float | None = option.machine_coverage_fail_under
        declared, ran, percent = self.coverage.totals()
        if limit is not None and percent < limit:
            self.failed = (
                f"FAIL: machine transition coverage {percent:.1f}% ({ran} of {declared} "
                f"declared transitions ran) is under --machine-coverage-fail-under={limit:g}"
            )
            if session.exitstatus == pytest.ExitCode.OK:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.worker:
            return
        from ._coverage import format_report

        write = terminalreporter.write_line
        terminalreporter.write_sep("=", "machine transition coverage")
        details = self.config.get_verbosity() >= 0
        for line in format_report(self.coverage, details=details):
            write(line)
        if self.written is not None:
            write(f"JSON report written to {self.written}")
        if self.failed is not None:
            write(self.failed, red=True, bold=True)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self.coverage.stop()
