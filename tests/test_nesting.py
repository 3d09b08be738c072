"""Nested states: compound states, their callbacks, checks, metrics and diagrams."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from statemachine_metrics import MachineCollector, MachineError, MeteredMachine, Trigger
from statemachine_metrics.testing import record

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def logged(log: list[str], tag: str) -> Any:
    return lambda *args, **kwargs: log.append(tag)


def machine_class(log: list[str], **attributes: Any) -> Any:
    """idle | running (initial fetching) { fetching | parsing (no initial) { html | json } }"""

    def state(name: str, **more: Any) -> dict[str, Any]:
        return {
            "name": name,
            "on_enter": logged(log, f"+{name}"),
            "on_exit": logged(log, f"-{name}"),
            **more,
        }

    body: dict[str, Any] = {
        "states": [
            state("idle"),
            state(
                "running",
                initial="fetching",
                children=[
                    state("fetching"),
                    state("parsing", children=[state("html"), state("json")]),
                ],
            ),
        ],
        "transitions": [
            ["start", "idle", "running"],
            ["parse", "running_fetching", "running_parsing"],
            ["html", "running_parsing", "running_parsing_html"],
            ["json", "running_parsing_html", "running_parsing_json"],
            ["stop", "running", "idle"],
            ["again", "running", "running"],
            ["up", "running_parsing_json", "running_parsing"],
            ["note", "running", None],
        ],
        **attributes,
    }
    return type("Crawler", (MeteredMachine,), body, registry=None)


@pytest.mark.anyio
async def test_callbacks_run_outermost_in_and_innermost_out(anyio_backend: str) -> None:
    log: list[str] = []
    crawler = machine_class(log)()
    assert crawler.state == "idle"
    assert await crawler.start()
    assert (crawler.state, log) == ("running_fetching", ["-idle", "+running", "+fetching"])
    log.clear()
    await crawler.parse()  # parsing has no initial child: the machine stays in it
    await crawler.html()
    assert (crawler.state, log) == ("running_parsing_html", ["-fetching", "+parsing", "+html"])
    log.clear()
    await crawler.json()
    assert log == ["-html", "+json"]
    log.clear()
    await crawler.up()  # to an ancestor: left and entered again
    assert (crawler.state, log) == ("running_parsing", ["-json", "-parsing", "+parsing"])
    log.clear()
    await crawler.again()  # reflexive on a compound state: all the way out and in again
    assert crawler.state == "running_fetching"
    assert log == ["-parsing", "-running", "+running", "+fetching"]
    log.clear()
    await crawler.note()  # internal: no callbacks, no move
    assert (crawler.state, log) == ("running_fetching", [])
    await crawler.stop()
    assert (crawler.state, log) == ("idle", ["-fetching", "-running", "+idle"])


@pytest.mark.anyio
async def test_a_childs_failed_conditions_fall_back_to_its_parent(anyio_backend: str) -> None:
    class Job(MeteredMachine, registry=None):
        states = ["idle", {"name": "busy", "initial": "a", "children": ["a", "b"]}, "done"]
        transitions = [
            ["start", "idle", "busy"],
            {"trigger": "go", "source": "busy_a", "dest": "done", "conditions": "ready"},
            ["go", "busy", "busy_b"],
        ]
        ready = False

    job = Job()
    await job.start()
    assert await job.may_go()
    assert await job.go()
    assert job.state == "busy_b"  # busy_a's transition did not pass; busy's ran
    assert await job.go()
    assert job.state == "busy_b"
    with pytest.raises(MachineError):
        await Job(initial="done").go()


@pytest.mark.anyio
async def test_is_state_with_and_without_substates(anyio_backend: str) -> None:
    crawler = machine_class([])(initial="running_parsing")
    assert crawler.is_running_parsing()
    assert not crawler.is_running()
    assert crawler.is_running(allow_substates=True)
    await crawler.html()
    assert not crawler.is_running_parsing()
    assert crawler.is_running_parsing(allow_substates=True)
    assert crawler.is_running_parsing_html()
    assert not crawler.is_idle(allow_substates=True)


@pytest.mark.anyio
async def test_auto_transitions_reach_every_state(anyio_backend: str) -> None:
    log: list[str] = []
    crawler = machine_class(log, auto_transitions=True)()
    await crawler.to_running_parsing_json()
    assert crawler.state == "running_parsing_json"
    await crawler.to_running()
    assert crawler.state == "running_fetching"
    log.clear()
    await crawler.to_running_parsing()
    assert (crawler.state, log) == ("running_parsing", ["-fetching", "+parsing"])


def test_states_are_those_a_machine_can_be_in() -> None:
    cls = machine_class([], initial="running")
    # running has an initial child, so a machine is never in running itself.
    assert cls.state_names() == (
        "idle",
        "running_fetching",
        "running_parsing",
        "running_parsing_html",
        "running_parsing_json",
    )
    assert cls.initial_state() == "running_fetching"
    assert cls().state == "running_fetching"
    table = {(t.trigger, t.source, t.dest) for t in cls.transition_table()}
    # stop, declared on running, applies in each of its states.
    assert {t for t in table if t[0] == "stop"} == {
        ("stop", state, "idle") for state in cls.state_names()[1:]
    }


def test_flat_definitions_keep_underscores() -> None:
    class Flat(MeteredMachine, registry=None):
        states = ["in_progress", "done"]
        transitions = [["finish", "in_progress", "done"]]

    assert Flat.state_names() == ("in_progress", "done")
    assert Flat().is_in_progress()


@pytest.mark.parametrize(
    ("states", "transitions", "message"),
    [
        (
            [{"name": "a", "initial": "z", "children": ["x", "y"]}],
            [],
            "Bad.states[0]: unknown initial child 'z'; children of 'a' are x, y",
        ),
        (
            [{"name": "a", "children": ["x", {"name": "x"}]}],
            [],
            "Bad.states[0].children[1]: duplicate state 'a_x'",
        ),
        (
            [{"name": "a", "children": ["in_progress"]}],
            [],
            "Bad.states[0].children[0]: state name 'in_progress' contains '_'",
        ),
        (
            ["in_flight", {"name": "a", "children": ["x"]}],
            [],
            "Bad.states[0]: state name 'in_flight' contains '_'",
        ),
        (
            [{"name": "a", "parallel": ["x", "y"]}],
            [],
            "Bad.states[0]: parallel states are not supported",
        ),
        (
            [{"name": "a", "children": [{"name": "x", "initial": "q"}]}],
            [],
            "Bad.states[0].children[0]: initial 'q' given, but state 'a_x' has no children",
        ),
        (
            [{"name": "a", "children": ["x"], "transitions": []}],
            [],
            "Bad.states[0]: unknown key(s) transitions",
        ),
        (
            [{"name": "a", "children": ["x"]}, "b"],
            [["go", "x", "b"]],
            "Bad.transitions[0]: unknown source state 'x'; states are a, a_x, b",
        ),
        (
            [{"name": "a", "children": ["x"]}, "b"],
            [["go", "b", "a_y"]],
            "Bad.transitions[0]: unknown dest state 'a_y'; states are a, a_x, b",
        ),
    ],
)
def test_bad_definitions_fail_at_class_creation(
    states: list[Any], transitions: list[Any], message: str
) -> None:
    with pytest.raises(ValueError, match=r"^Bad\.") as caught:
        type(
            "Bad", (MeteredMachine,), {"states": states, "transitions": transitions}, registry=None
        )
    assert str(caught.value).startswith(message)


def test_bad_initial_fails_at_class_creation() -> None:
    with pytest.raises(ValueError, match=r"Bad.initial: unknown state 'x'; states are a, a_x, b"):

        class Bad(MeteredMachine, registry=None):
            states = [{"name": "a", "children": ["x"]}, "b"]
            initial = "x"


@pytest.mark.anyio
async def test_metrics_name_every_state_by_full_name(anyio_backend: str) -> None:
    registry = CollectorRegistry()
    cls = machine_class([])
    registry.register(MachineCollector(cls))
    crawler = cls()
    await crawler.start()
    await crawler.parse()
    text = generate_latest(registry).decode()
    for state in cls.state_names():
        assert f'crawler_state{{crawler_state="{state}"}}' in text
        assert f'crawler_state_machines{{crawler_state="{state}"}}' in text
    assert 'running"' not in text  # running has an initial child: never current
    assert 'crawler_state{crawler_state="running_parsing"} 1.0' in text
    assert 'crawler_state_machines{crawler_state="running_parsing"} 1.0' in text
    assert (
        'crawler_state_transitions_total{from="running_fetching",to="running_parsing",'
        'trigger="parse"} 1.0'
    ) in text
    assert 'crawler_state_duration_seconds_count{crawler_state="running_fetching"} 1.0' in text
    await crawler.aclose()


@pytest.mark.anyio
async def test_recorder_and_typed_triggers(anyio_backend: str) -> None:
    class Door(MeteredMachine, registry=None):
        states = ["shut", {"name": "open", "initial": "ajar", "children": ["ajar", "wide"]}]
        push = Trigger("shut", "open")
        widen = Trigger("open_ajar", "open_wide")
        slam = Trigger("open", "shut")

    door = Door()
    with record(door) as recorder:
        await door.push()
        await door.widen()
        await door.slam()
    assert recorder.path(door) == ["shut", "open_ajar", "open_wide", "shut"]
    assert [(t.trigger, t.source, t.dest) for t in recorder.transitions] == [
        ("push", "shut", "open_ajar"),
        ("widen", "open_ajar", "open_wide"),
        ("slam", "open_wide", "shut"),
    ]


def test_mermaid_draws_composite_states() -> None:
    assert machine_class([]).mermaid().splitlines() == [
        "stateDiagram-v2",
        "[*] --> idle",
        "idle",
        "state running {",
        "    [*] --> running_fetching",
        '    state "fetching" as running_fetching',
        '    state "parsing" as running_parsing',
        "    state running_parsing {",
        '        state "html" as running_parsing_html',
        '        state "json" as running_parsing_json',
        "    }",
        "}",
        "idle --> running : start",
        "running_fetching --> running_parsing : parse",
        "running_parsing --> running_parsing_html : html",
        "running_parsing_html --> running_parsing_json : json",
        "running --> idle : stop",
        "running --> running : again",
        "running_parsing_json --> running_parsing : up",
        "running --> running : note",
    ]


@pytest.mark.anyio
async def test_mermaid_counts_sum_compound_states(anyio_backend: str) -> None:
    cls = machine_class([])
    machines = [cls(), cls(initial="running_parsing_html"), cls(initial="running_fetching")]
    lines = cls.mermaid(counts=True).splitlines()
    assert 'state "running (2)" as running' in lines
    assert '    state "parsing (1)" as running_parsing' in lines
    assert '        state "json (0)" as running_parsing_json' in lines
    assert 'state "idle (1)" as idle' in lines
    for machine in machines:
        await machine.aclose()


def load_example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.anyio
async def test_nested_worker_example(
    anyio_backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    example = load_example("nested_worker")
    paths, exposition = await example.main()
    page = ["running_fetching", "running_parsing", "running_saving", "idle"]
    assert paths["c1"] == ["idle", *page, *page]
    retried = ["running_fetching", "running_parsing", "failed", *page]
    assert paths["c2"] == ["idle", *page, *retried]
    assert 'myapp_crawler_state{crawler="c1",myapp_crawler_state="idle"} 1.0' in exposition
    text = generate_latest(example.REGISTRY).decode()
    assert (
        "myapp_crawler_state_transitions_total"
        '{from="running_parsing",to="failed",trigger="fail"} 1.0' in text
    )
    assert 'myapp_crawler_state_machines{myapp_crawler_state="idle"} 0.0' in text  # closed


def test_docs_diagram_is_the_examples() -> None:
    page = (EXAMPLES.parent / "docs" / "nested-states.md").read_text()
    drawn = page.split("```mermaid\n", 1)[1].split("```", 1)[0]
    assert drawn.strip() == load_example("nested_worker").Crawler.mermaid()


def test_example_prints_paths_diagram_and_metrics(capsys: pytest.CaptureFixture[str]) -> None:
    load_example("nested_worker").cli(["--backend", "trio"])
    out = capsys.readouterr().out
    assert "c2: idle -> running_fetching -> running_parsing -> running_saving -> idle" in out
    assert "state running {" in out
    assert 'myapp_crawler_state_machines{myapp_crawler_state="idle"} 2.0' in out


@pytest.mark.anyio
async def test_timeout_on_a_nested_state(anyio_backend: str) -> None:
    class Fetch(MeteredMachine, registry=None):
        states = [
            "idle",
            {"name": "running", "initial": "waiting", "children": ["waiting", "done"]},
        ]
        transitions = [["start", "idle", "running"], ["give_up", "running", "idle"]]
        timeouts = {"running_waiting": (0.01, "give_up")}

    async with Fetch() as fetch:
        await fetch.start()
        assert fetch.state == "running_waiting"
        await anyio.sleep(0.2)
        assert fetch.state == "idle"


class Crawl(MeteredMachine, registry=None, name="crawl_timeouts"):
    states = [
        "idle",
        {"name": "running", "children": ["fetching", "parsing"], "initial": "fetching"},
        "failed",
    ]
    transitions = [
        ["go", "idle", "running"],
        ["parse", "running_fetching", "running_parsing"],
        ["again", "running_parsing", "running_fetching"],
        ["restart", "running", "running"],
        ["fail", "running", "failed"],
    ]
    timeouts = {"running": (0.15, "fail")}


@pytest.mark.anyio
async def test_timeout_on_a_compound_state_runs_while_any_child_is_current() -> None:
    async with Crawl() as crawl:
        await crawl.go()
        # Moving among running's states every 30 ms does not restart its 150 ms timeout
        # (if it did, the machine would never fail here).
        for _ in range(30):
            await anyio.sleep(0.03)
            if crawl.state == "failed":
                break
            await (crawl.parse() if crawl.state == "running_fetching" else crawl.again())
        assert crawl.state == "failed"


@pytest.mark.anyio
async def test_timeout_on_a_compound_state_restarts_when_it_is_entered_again() -> None:
    async with Crawl() as crawl:
        await crawl.go()
        for _ in range(3):
            await anyio.sleep(0.1)
            await crawl.restart()  # leaves running and enters it again
        assert crawl.state == "running_fetching"
        for _ in range(100):
            await anyio.sleep(0.01)
            if crawl.state == "failed":
                break
        assert crawl.state == "failed"


def test_timeout_on_a_compound_state_needs_its_trigger_from_every_child() -> None:
    with pytest.raises(ValueError, match=r"trigger 'parse' has no transition from 'running'"):

        class Bad(MeteredMachine, registry=None, name="crawl_bad_timeout"):
            states = [
                "idle",
                {"name": "running", "children": ["fetching", "parsing"], "initial": "fetching"},
            ]
            transitions = [
                ["go", "idle", "running"],
                ["parse", "running_fetching", "running_parsing"],
            ]
            timeouts = {"running": (1.0, "parse")}


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the reference runs on asyncio only
@pytest.mark.anyio
async def test_prepare_event_runs_once_per_level_tried_as_in_hsm() -> None:
    from transitions.extensions.asyncio import HierarchicalAsyncMachine

    states = ["idle", {"name": "running", "children": ["a", "b"], "initial": "a"}]
    transitions = [
        ["stop", "running", "idle"],
        {"trigger": "stop", "source": "running_a", "dest": "running_b", "conditions": "no"},
    ]
    log: list[str] = []

    class Model:
        def no(self) -> bool:
            log.append("condition")
            return False

        def prep(self) -> None:
            log.append("prepare_event")

    model = Model()
    HierarchicalAsyncMachine(
        model, states=states, transitions=transitions, initial="running", prepare_event="prep"
    )
    await model.stop()  # type: ignore[attr-defined]
    expected, log[:] = list(log), []

    class Ours(MeteredMachine, registry=None, name="prepare_levels"):
        states = ["idle", {"name": "running", "children": ["a", "b"], "initial": "a"}]
        transitions = [
            ["stop", "running", "idle"],
            {"trigger": "stop", "source": "running_a", "dest": "running_b", "conditions": "no"},
        ]
        initial = "running"
        prepare_event = "prep"
        stop: Trigger

        def no(self) -> bool:
            log.append("condition")
            return False

        def prep(self) -> None:
            log.append("prepare_event")

    ours = Ours()
    await ours.stop()
    assert log == expected == ["prepare_event", "condition", "prepare_event"]
    assert ours.state == model.state == "idle"  # type: ignore[attr-defined]
