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
  whole run with the ini option ``reset_machine_metrics = false``.

The package is imported lazily: a session that never imports it pays nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .testing import MachineMetrics, Recorder

__all__ = ["machine_metrics", "machine_recorder"]

_MARKER = "keep_machine_metrics"
_INI = "reset_machine_metrics"


def pytest_addoption(parser: pytest.Parser) -> None:
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
