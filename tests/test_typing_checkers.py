"""What mypy (with and without the plugin) and pyright report on the fixtures in typing/.

A fixture line that must fail says so in a comment naming the error codes each checker
gives (``# mypy: attr-defined  pyright: reportAttributeAccessIssue``); every other line
must pass. Each checker runs once per session over all the fixtures it sees.

pyright comes from PyPI (the ``pyright`` package, which runs the npm package with the
machine's node); where it cannot run its tests skip, unless CI is set, where they fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mypy import api as mypy_api
from prometheus_client import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "typing"
TYPED = ["typed_ok.py", "typed_bad.py"]
TABLE = ["table_ok.py", "table_bad.py", "table_nonliteral.py"]
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
MYPY_LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): error: .*\[(?P<code>[\w-]+)\]$")

Reported = dict[tuple[str, int], set[str]]


def expected(checker: str, names: list[str]) -> Reported:
    """The error codes each fixture line declares for `checker`."""
    wanted: Reported = {}
    pattern = re.compile(rf"\b{checker}: ([\w-]+(?: [\w-]+)*?)(?:  |$)")
    for name in names:
        for number, line in enumerate((FIXTURES / name).read_text().splitlines(), start=1):
            comment = line.partition("#")[2]
            match = pattern.search(comment)
            if match:
                wanted[(name, number)] = set(match.group(1).split())
    return wanted


def run_mypy(tmp: Path, names: list[str], *, plugin: bool) -> Reported:
    config = tmp / ("with-plugin.ini" if plugin else "without-plugin.ini")
    config.write_text(
        "[mypy]\nstrict = True\npython_version = 3.10\n"
        + ("plugins = statemachine_metrics.mypy\n" if plugin else "")
        + "[mypy-transitions.*]\nignore_missing_imports = True\n"
    )
    cwd = Path.cwd()
    os.chdir(ROOT)  # the package under test, not another copy, answers its imports
    try:
        stdout, stderr, status = mypy_api.run(
            [
                "--config-file",
                str(config),
                "--cache-dir",
                str(tmp / "mypy-cache"),
                "--show-error-codes",
                "--no-error-summary",
                "--no-pretty",
                *(str(FIXTURES / name) for name in names),
            ]
        )
    finally:
        os.chdir(cwd)
    assert status in (0, 1), stderr or stdout
    reported: Reported = {}
    for line in stdout.splitlines():
        match = MYPY_LINE.match(line)
        if match:
            key = (Path(match["file"]).name, int(match["line"]))
            reported.setdefault(key, set()).add(match["code"])
        else:
            assert ": note: " in line, f"unexpected mypy output: {line}"
    return reported


@pytest.fixture(scope="session")
def mypy_with_plugin(tmp_path_factory: pytest.TempPathFactory) -> Reported:
    return run_mypy(tmp_path_factory.mktemp("mypy"), TYPED + TABLE, plugin=True)


@pytest.fixture(scope="session")
def mypy_without_plugin(tmp_path_factory: pytest.TempPathFactory) -> Reported:
    return run_mypy(tmp_path_factory.mktemp("mypy"), [*TYPED, "table_ok.py"], plugin=False)


def only(reported: Reported, names: list[str]) -> Reported:
    return {key: codes for key, codes in reported.items() if key[0] in names}


def test_mypy_with_the_plugin_reports_exactly_the_marked_lines(
    mypy_with_plugin: Reported,
) -> None:
    assert mypy_with_plugin == expected("mypy", TYPED + TABLE)


def test_the_typed_style_needs_no_plugin(mypy_without_plugin: Reported) -> None:
    assert only(mypy_without_plugin, TYPED) == expected("mypy", TYPED)


def test_without_the_plugin_mypy_cannot_see_the_table(mypy_without_plugin: Reported) -> None:
    # Every generated method is unknown, except the typed ones (reset, start, TaskMachine.start).
    table = only(mypy_without_plugin, ["table_ok.py"])
    assert all("attr-defined" in codes for codes in table.values())
    source = (FIXTURES / "table_ok.py").read_text().splitlines()
    uses = {n for n, line in enumerate(source, 1) if "assert_type(" in line and "." in line}
    typed = {n for n in uses if re.search(r"\b(w|lw|r|f)\.(start|reset)\(", source[n - 1])}
    assert {line for _, line in table} == uses - typed


# -- pyright ------------------------------------------------------------------------------


def _pyright() -> list[str] | None:
    found = shutil.which("pyright", path=os.path.dirname(sys.executable)) or shutil.which("pyright")
    if found is None:
        return None
    try:
        subprocess.run([found, "--version"], check=True, capture_output=True, timeout=300)
    except (OSError, subprocess.SubprocessError):
        return None
    return [found]


@pytest.fixture(scope="session")
def pyright_report(tmp_path_factory: pytest.TempPathFactory) -> Reported:
    command = _pyright()
    if command is None:
        why = "pyright cannot run (pip install pyright; it needs node or network for npm)"
        if IN_CI:
            pytest.fail(f"CI is set but {why}")
        pytest.skip(f"{why}; with CI=true this fails instead")
    tmp = tmp_path_factory.mktemp("pyright")
    for name in TYPED:
        shutil.copy(FIXTURES / name, tmp / name)
    (tmp / "pyrightconfig.json").write_text(
        json.dumps({"typeCheckingMode": "strict", "pythonVersion": "3.10"})
    )
    result = subprocess.run(
        [*command, "--outputjson", "--pythonpath", sys.executable, "--project", str(tmp)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp,
    )
    report = json.loads(result.stdout)
    reported: Reported = {}
    for diagnostic in report["generalDiagnostics"]:
        if diagnostic["severity"] != "error":
            continue
        key = (Path(diagnostic["file"]).name, diagnostic["range"]["start"]["line"] + 1)
        reported.setdefault(key, set()).add(diagnostic.get("rule", "error"))
    return reported


def test_pyright_strict_reports_exactly_the_marked_lines(pyright_report: Reported) -> None:
    wanted = expected("pyright", TYPED)
    assert set(pyright_report) == set(wanted)
    for key, codes in wanted.items():
        assert codes <= pyright_report[key], key


# -- the fixtures are real programs ---------------------------------------------------------


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    before = set(REGISTRY._collector_to_names)
    yield
    for collector in set(REGISTRY._collector_to_names) - before:
        REGISTRY.unregister(collector)


@pytest.mark.usefixtures("fresh_registry")
@pytest.mark.parametrize("name", [*TYPED, *TABLE])
def test_fixtures_define_valid_machines(name: str) -> None:
    spec = importlib.util.spec_from_file_location(f"typing_fixture_{name[:-3]}", FIXTURES / name)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.use
