"""Rules and dashboards generated from machine classes: `stuck_after`, and the output of
``python -m statemachine_metrics rules|dashboard`` read back by YAML, JSON and a real
PromQL parser (the promql-parser package, Prometheus' own grammar).

promtool and a real Prometheus check the same output in tests/test_prometheus_real.py.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import promql_parser
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from statemachine_metrics import MeteredMachine, TaskMachine
from statemachine_metrics.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
_numbers = itertools.count()


class Uploader(MeteredMachine, namespace="ops", labelnames=("worker",), registry=None):
    """State of an uploader"""

    states = ["idle", "uploading", "failed", "in review"]
    transitions = [
        ["upload", "idle", "uploading"],
        ["done", "uploading", "idle"],
        ["fail", "uploading", "failed"],
        ["retry", "failed", "uploading"],
        ["review", "idle", "in review"],
        ["approve", "in review", "idle"],
    ]
    stuck_after = {"uploading": 300, "in review": 86400.0}
    timeouts = {"failed": (30.0, "retry")}


class Fetch(TaskMachine, namespace="ops", registry=None):
    pass


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def machines_module() -> Iterator[Any]:
    """Put classes in a fresh importable module; return a function doing so."""
    names: list[str] = []

    def make(*classes: type[MeteredMachine]) -> str:
        name = f"ops_module_{next(_numbers)}"
        module = ModuleType(name)
        for cls in classes:
            setattr(module, cls.__name__, cls)
            cls.__module__ = name
        sys.modules[name] = module
        names.append(name)
        return name

    yield make
    for name in names:
        sys.modules.pop(name, None)


def generated_rules(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    status, out, err = run(["rules", *argv], capsys)
    assert (status, err) == (0, ""), err
    loaded: dict[str, Any] = yaml.safe_load(out)
    return loaded


def exported_names(cls: type[MeteredMachine]) -> set[str]:
    """Every sample name the class's metrics show, histogram series included."""
    names = set(cls.metric_names())
    for name in cls.metric_names():
        if name.endswith("_seconds") and name != f"{cls.metric_names()[0]}_oldest_seconds":
            names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    return names


def selectors(expr: str) -> list[tuple[str, list[str]]]:
    """The metric names and matchers of an expression, parsed by a real PromQL parser."""
    found: list[tuple[str, list[str]]] = []

    def visit(node: object) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            found.append((node.name, [str(m) for m in node.matchers.matchers]))
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


# -- stuck_after ---------------------------------------------------------------------------


def test_stuck_after_is_inherited() -> None:
    class Louder(Uploader):
        pass

    assert Louder.stuck_after == {"uploading": 300, "in review": 86400.0}
    assert MeteredMachine.stuck_after == {}


def test_stuck_after_unknown_state() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Bad.stuck_after['uploadng']: unknown state 'uploadng'; states are idle, uploading"
        ),
    ):

        class Bad(MeteredMachine, registry=None):
            states = ["idle", "uploading"]
            transitions = [["upload", "idle", "uploading"]]
            stuck_after = {"uploadng": 60}


def test_stuck_after_checked_again_in_a_subclass_with_its_own_states() -> None:
    with pytest.raises(ValueError, match=r"Other.stuck_after\['uploading'\]: unknown state"):

        class Other(Uploader):
            states = ["new", "old"]
            transitions = [["age", "new", "old"]]
            timeouts = {}


@settings(max_examples=30, deadline=None)
@given(
    st.one_of(
        st.floats(max_value=0),
        st.sampled_from([math.inf, -math.inf, math.nan, True, False, None, "60", [60], 0]),
        st.integers(max_value=0),
    )
)
def test_stuck_after_bad_seconds(seconds: object) -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"Bad.stuck_after['idle']: seconds must be a positive finite number, got {seconds!r}"
        ),
    ):

        class Bad(MeteredMachine, registry=None):
            states = ["idle", "busy"]
            transitions = [["go", "idle", "busy"]]
            stuck_after = {"idle": seconds}


def test_stuck_after_must_be_a_dict() -> None:
    with pytest.raises(TypeError, match=r"Bad.stuck_after must be a dict of state -> seconds"):

        class Bad(MeteredMachine, registry=None):
            states = ["idle", "busy"]
            transitions = [["go", "idle", "busy"]]
            stuck_after = [("idle", 5)]  # type: ignore[assignment]


# -- rules ---------------------------------------------------------------------------------


def test_rules_groups_and_alerts(machines_module: Any, capsys: pytest.CaptureFixture[str]) -> None:
    name = machines_module(Uploader, Fetch)
    groups = generated_rules([name], capsys)["groups"]
    assert [g["name"] for g in groups] == [f"{name}:Uploader", f"{name}:Fetch"]
    alerts = {
        (r["alert"], r.get("labels", {}).get("state")): r
        for r in groups[0]["rules"]
        if "alert" in r
    }
    assert set(alerts) == {
        ("UploaderStuck", "uploading"),
        ("UploaderStuck", "in review"),
        ("UploaderTimeoutNotFired", "failed"),
        ("UploaderErrors", None),
    }
    stuck = alerts["UploaderStuck", "in review"]
    assert (
        stuck["expr"] == 'ops_uploader_state_oldest_seconds{ops_uploader_state="in review"} > 86400'
    )
    assert stuck["labels"] == {"state": "in review"}
    assert "for" not in stuck  # the limit is the wait
    assert (
        "longer than its limit of 1d (Uploader.stuck_after)" in stuck["annotations"]["description"]
    )
    assert stuck["annotations"]["summary"] == "A Uploader machine is stuck in state in review"
    timer = alerts["UploaderTimeoutNotFired", "failed"]
    assert timer["expr"].endswith("> 90")  # 30 s timeout + 60 s grace
    assert timer["labels"] == {"state": "failed", "trigger": "retry"}
    assert "after 30s" in timer["annotations"]["description"]
    for rule in (r for g in groups for r in g["rules"] if "alert" in r):
        assert set(rule["annotations"]) == {"summary", "description"}
    # A class without stuck_after or timeouts still gets its error alert and recordings.
    assert [r["alert"] for r in groups[1]["rules"] if "alert" in r] == ["FetchErrors"]
    records = [r["record"] for r in groups[1]["rules"] if "record" in r]
    assert "job:ops_fetch_state_transitions:rate5m" in records
    assert "job:ops_fetch_state_machines:sum" in records


def test_rules_every_expression_parses_and_names_existing_metrics(
    machines_module: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    name = machines_module(Uploader, Fetch)
    groups = generated_rules([name, "--window", "2m", "--for", "1m"], capsys)["groups"]
    for cls, group in zip((Uploader, Fetch), groups):
        exported = exported_names(cls)
        for rule in group["rules"]:
            found = selectors(rule["expr"])
            assert found, rule
            for metric, _ in found:
                assert metric in exported, (metric, rule)
            if "record" in rule:
                assert rule["record"].startswith("job:")
                assert "[2m]" in rule["expr"] or "rate" not in rule["expr"]
            else:
                assert rule["for"] == "1m"


def test_rules_for_one_class_labels_and_error_ratio(
    machines_module: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    name = machines_module(Uploader, Fetch)
    argv = [
        f"{name}:Uploader",
        "--label",
        "severity=page",
        "--label",
        "team=ops",
        "--error-ratio",
        "0.25",
        "--timer-grace",
        "0",
    ]
    groups = generated_rules(argv, capsys)["groups"]
    assert len(groups) == 1
    alerts = [r for r in groups[0]["rules"] if "alert" in r]
    for alert in alerts:
        assert alert["labels"]["severity"] == "page"
        assert alert["labels"]["team"] == "ops"
    (errors,) = (a for a in alerts if a["alert"] == "UploaderErrors")
    assert errors["expr"].rstrip().endswith("> 0.25")
    (timer,) = (a for a in alerts if a["alert"] == "UploaderTimeoutNotFired")
    assert timer["expr"].endswith("> 30")


def test_rules_of_classes_sharing_metrics_are_one_group(
    machines_module: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    class Louder(Uploader):
        async def on_enter_failed(self) -> None:
            pass

    name = machines_module(Uploader, Louder)
    groups = generated_rules([name], capsys)["groups"]
    assert [g["name"] for g in groups] == [f"{name}:Uploader"]
    # Named alone, the subclass gets its own group, with its own name on the alerts.
    groups = generated_rules([f"{name}:Louder"], capsys)["groups"]
    assert {r["alert"] for r in groups[0]["rules"] if "alert" in r} == {
        "LouderStuck",
        "LouderTimeoutNotFired",
        "LouderErrors",
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--window", "5 minutes"], "window '5 minutes' is not a Prometheus duration"),
        (["--for", "0m"], "for '0m' is not a Prometheus duration"),
        (["--label", "severity"], "--label expects NAME=VALUE, e.g. severity=page"),
        (["--label", "2x=y"], "label '2x' is not a valid label name"),
        (["--label", "state=x"], "label 'state' is set by the alerts themselves"),
        (["--error-ratio", "0"], "error ratio must be in (0, 1], got 0.0"),
        (["--timer-grace", "nan"], "timer grace must be a finite number >= 0"),
    ],
)
def test_rules_bad_options_exit_2(
    machines_module: Any, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    name = machines_module(Uploader)
    status, out, err = run(["rules", name, *argv], capsys)
    assert (status, out) == (2, "")
    assert err.startswith("usage: python -m statemachine_metrics rules")
    assert message in err


state_names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda s: s != "other"
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    state=state_names,
    seconds=st.floats(min_value=1e-3, max_value=1e9, allow_nan=False),
    label=st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
)
def test_rules_survive_any_state_name_and_label_value(
    state: str, seconds: float, label: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:

        class Odd(MeteredMachine, registry=None):
            states = ["other", state]
            transitions = [["go", "other", state]]
            stuck_after = {state: seconds}

    except ValueError:
        assume(False)  # a state name the library refuses
    module = ModuleType(f"ops_odd_{next(_numbers)}")
    Odd.__module__ = module.__name__
    module.Odd = Odd  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        groups = generated_rules([module.__name__, "--label", f"note={label}"], capsys)["groups"]
    finally:
        del sys.modules[module.__name__]
    (stuck,) = (r for r in groups[0]["rules"] if r.get("alert") == "OddStuck")
    assert stuck["labels"] == {"state": state, "note": label}
    # Annotations are Go templates: the state is literal text in them, whatever it holds.
    summary = stuck["annotations"]["summary"]
    assert summary.replace('{{ "{{" }}', "{{") == f"A Odd machine is stuck in state {state}"
    assert "{{" not in summary.replace('{{ "{{" }}', "")
    ((metric, matchers),) = selectors(stuck["expr"])
    assert metric == "odd_state_oldest_seconds"
    assert len(matchers) == 1
    assert promql_parser.parse(stuck["expr"]).rhs.val == pytest.approx(seconds, rel=1e-12)
    # The parser unquotes the matcher's value: it is the state, whatever its characters.
    (selector,) = _vector_selectors(stuck["expr"])
    assert [(m.name, m.value) for m in selector.matchers.matchers] == [("odd_state", state)]


def _vector_selectors(expr: str) -> list[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []

    def visit(node: object) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def test_rules_of_a_template_or_an_empty_module(
    machines_module: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    class Template(MeteredMachine, abstract=True, registry=None):
        states = ["a", "b"]
        transitions = [["go", "a", "b"]]

    name = machines_module(Template)
    status, out, err = run(["rules", f"{name}:Template"], capsys)
    assert (status, out) == (2, "")
    assert "Template is abstract (a template): it has no metrics of its own" in err
    status, out, err = run(["rules", name], capsys)
    assert (status, out, err) == (1, "", f"{name} defines no machine class with metrics\n")


# -- dashboards ----------------------------------------------------------------------------

PANELS = [
    "Machines per state",
    "Transitions per second by trigger",
    "Time in state (p50, p95, p99)",
    "Longest stay per state",
    "Errors per second by exception",
    "Trigger latency (p50, p95, p99)",
]

needs_sdk = pytest.mark.skipif(
    sys.version_info < (3, 11),
    reason="grafana-foundation-sdk (the grafana extra) needs Python 3.11 or later",
)

# What Grafana puts in place of the dashboard's variables before it runs a query.
VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}


def interpolate(expr: str) -> str:
    for variable, value in VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, expr
    return expr


def generated_dashboard(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    status, out, err = run(["dashboard", *argv], capsys)
    assert (status, err) == (0, ""), err
    loaded: dict[str, Any] = json.loads(out)
    return loaded


def rows(board: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Row title -> its panels (the dashboard's panels follow their row, when expanded)."""
    found: dict[str, list[dict[str, Any]]] = {}
    current: list[dict[str, Any]] = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            current = found.setdefault(panel["title"], [])
            current.extend(panel.get("panels", []))
        else:
            current.append(panel)
    return found


@needs_sdk
def test_dashboard_of_a_module(machines_module: Any, capsys: pytest.CaptureFixture[str]) -> None:
    name = machines_module(Uploader, Fetch)
    board = generated_dashboard([name], capsys)
    assert board["title"] == f"{name} machines"
    assert "statemachine_metrics" in board["tags"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    query = variables["instance"]["query"]
    inner = re.fullmatch(r"label_values\((.*), instance\)", query)
    assert inner, query
    assert {metric for metric, _ in selectors(inner[1])} == {None}  # {__name__=~...} only
    assert re.search(r"ops_uploader_state_machines\|ops_fetch_state_machines", query)
    found = rows(board)
    assert list(found) == [
        "Uploader (ops_uploader_state)",
        "Fetch (ops_fetch_state)",
    ]
    for cls, panels in zip((Uploader, Fetch), found.values()):
        assert [p["title"] for p in panels] == PANELS
        exported = exported_names(cls)
        for panel in panels:
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                for metric, matchers in selectors(interpolate(target["expr"])):
                    assert metric in exported, (metric, panel["title"])
                    assert 'instance=~".*"' in matchers
        positions = {(p["gridPos"]["x"], p["gridPos"]["y"]) for p in panels}
        assert len(positions) == len(panels)  # no two panels on top of each other


@needs_sdk
def test_dashboard_panels(machines_module: Any, capsys: pytest.CaptureFixture[str]) -> None:
    name = machines_module(Uploader)
    board = generated_dashboard([f"{name}:Uploader", "--title", "Uploads"], capsys)
    assert board["title"] == "Uploads"
    panels = {p["title"]: p for p in next(iter(rows(board).values()))}
    stacked = panels["Machines per state"]
    assert stacked["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    assert [t["expr"] for t in stacked["targets"]] == [
        'sum by (ops_uploader_state) (ops_uploader_state_machines{instance=~"$instance"})'
    ]
    assert [t["legendFormat"] for t in stacked["targets"]] == ["{{ops_uploader_state}}"]
    quantiles = panels["Time in state (p50, p95, p99)"]["targets"]
    assert [t["legendFormat"] for t in quantiles] == [
        "{{ops_uploader_state}} p50",
        "{{ops_uploader_state}} p95",
        "{{ops_uploader_state}} p99",
    ]
    assert [promql_parser.parse(interpolate(t["expr"])).func.name for t in quantiles] == [
        "histogram_quantile"
    ] * 3
    errors = panels["Errors per second by exception"]["targets"]
    assert [t["legendFormat"] for t in errors] == ["{{error}} in {{trigger}}"]
    # The stuck_after limits are drawn on the longest-stay panel, one line per state.
    stuck = panels["Longest stay per state"]
    lines = {
        o["matcher"]["options"]: [p["value"] for p in o["properties"] if p["id"] == "thresholds"]
        for o in stuck["fieldConfig"]["overrides"]
    }
    assert lines == {
        "uploading": [
            {
                "mode": "absolute",
                "steps": [{"color": "green", "value": None}, {"color": "red", "value": 300.0}],
            }
        ],
        "in review": [
            {
                "mode": "absolute",
                "steps": [{"color": "green", "value": None}, {"color": "red", "value": 86400.0}],
            }
        ],
    }
    assert "uploading 5m, in review 1d" in stuck["description"]


def test_dashboard_without_the_grafana_extra(
    machines_module: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    name = machines_module(Uploader)
    for module in [m for m in sys.modules if m.startswith("grafana_foundation_sdk")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "grafana_foundation_sdk", None)  # import fails
    status, out, err = run(["dashboard", name], capsys)
    assert (status, out) == (2, "")
    assert "pip install 'statemachine-metrics[grafana]'" in err


# -- PromQL in the documentation -----------------------------------------------------------

PROMQL_FENCE = re.compile(r"^```promql[^\n]*\n(.*?)^```", re.S | re.M)


def docs_promql() -> list[tuple[str, str]]:
    return [
        (f"{page.relative_to(ROOT)}", match[1].strip())
        for page in sorted((ROOT / "docs").rglob("*.md"))
        for match in PROMQL_FENCE.finditer(page.read_text())
    ]


def test_docs_have_promql() -> None:
    assert len(docs_promql()) >= 3


@pytest.mark.parametrize(("page", "expr"), docs_promql())
def test_docs_promql_parses(page: str, expr: str) -> None:
    assert selectors(interpolate(expr)), f"{page}: {expr}"
