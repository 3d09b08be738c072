"""`python -m statemachine_metrics`: list the machines of a module, print a diagram."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from statemachine_metrics.__main__ import main

_numbers = itertools.count()

WORKERS = """
from statemachine_metrics import MeteredMachine
from statemachine_metrics import MachineCollector  # imported: not listed


class Base(MeteredMachine):
    '''No states: not a machine, not listed.'''


class Template(MeteredMachine, abstract=True, registry=None):
    states = ["new", "done"]
    transitions = [["close", "new", "done"]]


class Worker(MeteredMachine, namespace="myapp", labelnames=("worker",), registry=None):
    '''Current state of the background worker'''

    states = ["idle", "running", "error"]
    initial = "idle"
    transitions = [
        ["start", "idle", "running"],
        ["finish", "running", "idle"],
        ["fail", ["idle", "running"], "error"],
    ]

    class Part(MeteredMachine, registry=None):
        states = ["loose", "fixed"]
        transitions = [["fix", "loose", "fixed"]]


class Louder(Worker):
    def on_enter_error(self) -> None:
        print("error!")


Alias = Worker
not_a_class = 42
"""


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """Write a module into a temporary directory made current; return its unique name."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    names: list[str] = []

    def write(source: str) -> str:
        name = f"cli_module_{next(_numbers)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of the command line, argparse's exits included."""
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


def test_list(module: Callable[[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    name = module(WORKERS)
    status, out, err = run(["list", name], capsys)
    assert (status, err) == (0, "")
    assert out == textwrap.dedent(
        f"""\
        {name}:Template (abstract)
          states:   new (initial), done
          triggers: close
          metrics:  (none: each concrete subclass gets its own)

        {name}:Worker
          states:   idle (initial), running, error
          triggers: start, finish, fail
          metrics:  myapp_worker_state (labels: worker)
                    myapp_worker_state_machines
                    myapp_worker_state_transitions_total
                    myapp_worker_state_duration_seconds
                    myapp_worker_state_errors_total
                    myapp_worker_state_oldest_seconds
                    myapp_worker_state_trigger_duration_seconds

        {name}:Louder
          states:   idle (initial), running, error
          triggers: start, finish, fail
          metrics:  myapp_worker_state (labels: worker)
                    myapp_worker_state_machines
                    myapp_worker_state_transitions_total
                    myapp_worker_state_duration_seconds
                    myapp_worker_state_errors_total
                    myapp_worker_state_oldest_seconds
                    myapp_worker_state_trigger_duration_seconds
        """
    )


def test_list_module_without_machines(
    module: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    name = module("from statemachine_metrics import MeteredMachine\nx = 1\n")
    status, out, err = run(["list", name], capsys)
    assert (status, out) == (1, "")
    assert err == f"{name} defines no machine class\n"


def test_list_a_package_module(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(["list", "statemachine_metrics._machine"], capsys)
    assert status == 1  # MeteredMachine itself declares no states
    assert out == ""


def test_diagram(module: Callable[[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    name = module(WORKERS)
    status, out, err = run(["diagram", f"{name}:Worker"], capsys)
    assert (status, err) == (0, "")
    assert out == textwrap.dedent(
        """\
        stateDiagram-v2
        [*] --> idle
        idle --> running : start
        running --> idle : finish
        idle --> error : fail
        running --> error : fail
        """
    )
    from_code = sys.modules[name].Worker.mermaid()
    assert out == from_code + "\n"


def test_diagram_of_nested_class(
    module: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    name = module(WORKERS)
    status, out, _ = run(["diagram", f"{name}:Worker.Part"], capsys)
    assert status == 0
    assert out.splitlines() == ["stateDiagram-v2", "[*] --> loose", "loose --> fixed : fix"]


def test_diagram_counts(module: Callable[[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    name = module(
        WORKERS + "\nkept = [Worker(labels={'worker': 'a'}), Worker(labels={'worker': 'b'}, "
        "initial='error')]\n"
    )
    status, out, _ = run(["diagram", f"{name}:Louder", "--counts"], capsys)
    assert status == 0
    assert out.splitlines()[-3:] == [
        'state "idle (1)" as idle',
        'state "running (0)" as running',
        'state "error (1)" as error',
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["diagram", "{name}"], "expected MODULE:CLASS, e.g. myapp.workers:Worker; got '{name}'"),
        (["diagram", ":Worker"], "expected MODULE:CLASS"),
        (["diagram", "{name}:"], "expected MODULE:CLASS"),
        (
            ["diagram", "{name}:Nope"],
            "module '{name}' has no attribute 'Nope'; "
            "its machine classes are Template, Worker, Louder\n",
        ),
        (
            ["diagram", "{name}:Worker.Nope"],
            "module '{name}' has no attribute 'Worker.Nope'; its machine classes are",
        ),
        (["rules", "{name}:Nope"], "has no attribute 'Nope'; its machine classes are"),
        (["dashboard", "{name}:Nope"], "has no attribute 'Nope'; its machine classes are"),
        (["list", "{name}.py"], "no module named '{name}.py'; did you mean '{name}'?"),
        (["rules", "{name}.py"], "no module named '{name}.py'; did you mean '{name}'?"),
        (
            ["list", "./pkg/{name}.py"],
            "no module named './pkg/{name}.py'; did you mean 'pkg.{name}'?",
        ),
        (["list", "my-app/x.py"], "no module named 'my-app/x.py' (give a module name, not a file)"),
        (["dashboard", "{name}.py:Worker"], "did you mean '{name}'?"),
        (["rules"], "the following arguments are required: MODULE[:CLASS]"),
        (["diagram", "{name}:not_a_class"], "{name}:not_a_class is not a class but a int"),
        (["diagram", "{name}:MachineCollector"], "is a class, but not a MeteredMachine subclass"),
        (["diagram", "{name}:Base"], "{name}:Base declares no states"),
        (["diagram", "{name}:Template", "--counts"], "Template is abstract (a template)"),
        (["diagram", "no_such_module_here:Worker"], "no module named 'no_such_module_here'"),
        (["list", "no_such_module_here.sub"], "no module named 'no_such_module_here'"),
        (["list", "3cheers"], "'3cheers' is not a module name"),
        (["list"], "the following arguments are required: MODULE"),
        ([], "the following arguments are required: COMMAND"),
        (["draw", "x"], "invalid choice: 'draw'"),
    ],
)
def test_errors_exit_2(
    module: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    name = module(WORKERS)
    status, out, err = run([arg.format(name=name) for arg in argv], capsys)
    assert (status, out) == (2, "")
    assert err.startswith("usage: python -m statemachine_metrics")
    assert message.format(name=name) in err


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "from statemachine_metrics import MeteredMachine\n"
            "class Bad(MeteredMachine, registry=None):\n"
            "    states = ['idle', 'running']\n"
            "    transitions = [['start', 'idle', 'runing']]\n",
            "ValueError: Bad.transitions[0]: unknown dest state 'runing'; states are idle, running",
        ),
        ("def broken(:\n", ".py:1: "),
        ("import a_dependency_that_is_missing\n", "ModuleNotFoundError: No module named"),
        ("raise RuntimeError('boom')\n", "RuntimeError: boom"),
    ],
)
def test_modules_that_fail_to_import_exit_2(
    module: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
    source: str,
    message: str,
) -> None:
    name = module(source)
    for argv in (["list", name], ["diagram", f"{name}:Bad"]):
        status, out, err = run(argv, capsys)
        assert (status, out) == (2, "")
        assert f"importing '{name}' failed: " in err
        assert message in err


def test_real_process(tmp_path: Path) -> None:
    (tmp_path / "jobs.py").write_text(
        "from statemachine_metrics import MeteredMachine\n\n"
        "class Job(MeteredMachine):\n"
        "    states = ['queued', 'running']\n"
        "    transitions = [['run', 'queued', 'running']]\n"
    )
    command = [sys.executable, "-m", "statemachine_metrics", "diagram"]
    done = subprocess.run(
        [*command, "jobs:Job"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == "stateDiagram-v2\n[*] --> queued\nqueued --> running : run\n"
    failed = subprocess.run(
        [*command, "jobs:Nope"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert (failed.returncode, failed.stdout) == (2, "")
    assert "error: module 'jobs' has no attribute 'Nope'; its machine classes are Job\n" in (
        failed.stderr
    )


def test_module_without_machine_classes_names_none(
    module: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    name = module("x = 1\n")
    status, out, err = run(["diagram", f"{name}:Worker"], capsys)
    assert (status, out) == (2, "")
    assert f"module '{name}' has no attribute 'Worker'; it defines no machine class\n" in err


def test_rules_and_dashboard_of_a_module(
    module: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    # The classes sharing metrics (Worker and its subclass Louder) make one group; the
    # template (no metrics) and the nested class (not at module level) none.
    name = module(WORKERS)
    status, out, err = run(["rules", name, "--label", "severity=page"], capsys)
    assert (status, err) == (0, "")
    assert out.startswith(
        f"# Prometheus rules for the machine classes of {name}, generated by\n"
        f"# python -m statemachine_metrics rules {name} --label severity=page\n"
        "groups:\n"
        f"  - name: {name}:Worker\n"
    )
    assert out.count("  - name: ") == 1
    assert "      - alert: WorkerErrors\n" in out


@pytest.mark.skipif(
    sys.version_info < (3, 11),
    reason="grafana-foundation-sdk (the grafana extra) needs Python 3.11 or later",
)
def test_dashboard_of_a_module(
    module: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    name = module(WORKERS)
    status, out, err = run(["dashboard", name], capsys)
    assert (status, err) == (0, "")
    assert out.startswith("{")
    assert f'"title": "{name} machines"' in out
    assert '"title": "Worker (myapp_worker_state)"' in out


def test_rules_of_a_module_without_machines(
    module: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    name = module("x = 1\n")
    for command in ("rules", "dashboard"):
        status, out, err = run([command, name], capsys)
        assert (status, out) == (1, "")
        assert err == f"{name} defines no machine class with metrics\n"
