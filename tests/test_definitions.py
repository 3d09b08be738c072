"""Machine class definitions: checked when the class is created, and what a class exposes."""

from __future__ import annotations

import enum
import re
import types
from typing import Any
from unittest.mock import MagicMock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Gauge
from transitions import Machine

from statemachine_metrics import Enum, MachineCollector, MeteredMachine, TransitionSpec

STATES = ["idle", "running", "error"]
TRANSITIONS = [["start", "idle", "running"], ["finish", "running", "idle"]]


def define(
    body: dict[str, Any] | None = None,
    *,
    cls_name: str = "Bad",
    bases: tuple[type, ...] = (MeteredMachine,),
    **keywords: Any,
) -> type[MeteredMachine]:
    """Create a machine class as a ``class`` statement would (``registry=None`` unless given)."""
    keywords.setdefault("registry", None)
    namespace = {"states": STATES, "transitions": TRANSITIONS} if body is None else body
    return types.new_class(cls_name, bases, keywords, lambda ns: ns.update(namespace))


def registry_of(*classes: type[MeteredMachine]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(MachineCollector(*classes))
    return registry


def documentation_of(cls: type[MeteredMachine]) -> str:
    names = {metric.name: metric.documentation for metric in registry_of(cls).collect()}
    return names[cls.metric_names()[0]]


# -- bad definitions fail at class creation ---------------------------------------------------


def _states(*entries: Any) -> dict[str, Any]:
    return {"states": list(entries), "transitions": []}


def _transitions(*entries: Any) -> dict[str, Any]:
    return {"states": STATES, "transitions": list(entries)}


def _clash(name: str) -> dict[str, Any]:
    return {"states": STATES, "transitions": [[name, "idle", "running"]]}


BAD_BODIES = [
    pytest.param(
        _transitions(["start", "idel", "running"]),
        ValueError,
        "Bad.transitions[0]: unknown source state 'idel'; states are idle, running, error",
        id="unknown-source",
    ),
    pytest.param(
        _transitions(["start", "idle", "running"], ["fail", ["idle", "runing"], "error"]),
        ValueError,
        "Bad.transitions[1]: unknown source state 'runing'",
        id="unknown-source-in-list",
    ),
    pytest.param(
        _transitions(["start", "idle", "runing"]),
        ValueError,
        "Bad.transitions[0]: unknown dest state 'runing'; states are idle, running, error",
        id="unknown-dest",
    ),
    pytest.param(
        _transitions({"trigger": "start", "source": "idle", "dest": "nowhere"}),
        ValueError,
        "Bad.transitions[0]: unknown dest state 'nowhere'",
        id="unknown-dest-dict",
    ),
    pytest.param(
        _states("idle", "running", "idle"),
        ValueError,
        "Bad.states[2]: duplicate state 'idle'",
        id="duplicate-state",
    ),
    pytest.param(
        _states("idle", {"name": "idle"}),
        ValueError,
        "Bad.states[1]: duplicate state 'idle'",
        id="duplicate-state-dict",
    ),
    pytest.param(_states(), ValueError, "Bad.states is empty", id="empty-states"),
    pytest.param(
        {"states": STATES, "transitions": TRANSITIONS, "initial": "nope"},
        ValueError,
        "Bad.initial: unknown state 'nope'; states are idle, running, error",
        id="initial-not-in-states",
    ),
    pytest.param(
        {"states": "idle running", "transitions": []},
        TypeError,
        "Bad.states must be a list",
        id="states-as-string",
    ),
    pytest.param(
        _states("idle", 5),
        TypeError,
        "Bad.states[1]: a state name must be a non-empty string, got 5",
        id="state-not-a-string",
    ),
    pytest.param(
        _states("idle", {"name": "running", "enter": "go"}),
        ValueError,
        "Bad.states[1]: unknown key(s) enter",
        id="state-dict-unknown-key",
    ),
    pytest.param(
        _states({"on_enter": "go"}),
        TypeError,
        "Bad.states[0]: a state name must be a non-empty string, got None",
        id="state-dict-without-name",
    ),
    pytest.param(
        {"states": STATES, "transitions": "start"},
        TypeError,
        "Bad.transitions must be a list",
        id="transitions-as-string",
    ),
    pytest.param(
        _transitions(["start", "idle"]),
        TypeError,
        "Bad.transitions[0]: expected [trigger, source, dest]",
        id="transition-too-short",
    ),
    pytest.param(
        _transitions(["start", "idle", "running", None, None, None, None, None, None]),
        TypeError,
        "Bad.transitions[0]: expected [trigger, source, dest]",
        id="transition-too-long",
    ),
    pytest.param(
        _transitions("start"),
        TypeError,
        "Bad.transitions[0]: expected [trigger, source, dest]",
        id="transition-not-a-list",
    ),
    pytest.param(
        _transitions({"trigger": "start", "src": "idle", "source": "idle", "dest": "running"}),
        ValueError,
        "Bad.transitions[0]: unknown key(s) src",
        id="transition-dict-unknown-key",
    ),
    pytest.param(
        _transitions({"trigger": "start", "source": "idle"}),
        ValueError,
        "Bad.transitions[0]: missing dest",
        id="transition-dict-missing-dest",
    ),
    pytest.param(
        _transitions({"source": "idle", "dest": "running"}),
        ValueError,
        "Bad.transitions[0]: missing trigger",
        id="transition-dict-missing-trigger",
    ),
    pytest.param(
        _transitions(["go-now", "idle", "running"]),
        ValueError,
        "Bad.transitions[0]: trigger must be a Python identifier, got 'go-now'",
        id="trigger-not-identifier",
    ),
    pytest.param(
        _transitions([5, "idle", "running"]),
        ValueError,
        "Bad.transitions[0]: trigger must be a Python identifier, got 5",
        id="trigger-not-string",
    ),
    pytest.param(
        {"states": STATES, "transitions": TRANSITIONS, "duration_buckets": [1.0, 0.5]},
        ValueError,
        "Bad.duration_buckets must be distinct numbers in increasing order",
        id="buckets-decreasing",
    ),
    pytest.param(
        {"states": STATES, "transitions": TRANSITIONS, "duration_buckets": [0.5, 0.5]},
        ValueError,
        "Bad.duration_buckets must be distinct numbers in increasing order",
        id="buckets-duplicate",
    ),
    pytest.param(
        {"states": STATES, "transitions": TRANSITIONS, "duration_buckets": []},
        ValueError,
        "Bad.duration_buckets must be distinct numbers",
        id="buckets-empty",
    ),
    pytest.param(
        {"states": STATES, "transitions": TRANSITIONS, "duration_buckets": ["fast"]},
        ValueError,
        "Bad.duration_buckets must be numbers",
        id="buckets-not-numbers",
    ),
    pytest.param(
        {"states": STATES, "transitions": TRANSITIONS, "duration_buckets": [0.1, float("nan")]},
        ValueError,
        "Bad.duration_buckets must be distinct numbers",
        id="buckets-nan",
    ),
]


@pytest.mark.parametrize(("body", "error", "message"), BAD_BODIES)
def test_bad_definition_fails_at_class_creation(
    body: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        define(body)


@pytest.mark.parametrize(
    "name",
    # MeteredMachine's API, and attributes every machine class has.
    [
        "trigger",
        "aclose",
        "labels",
        "closed",
        "track",
        "mermaid",
        "metric_names",
        "state_names",
    ],
)
def test_trigger_clashing_with_machine_api_fails(name: str) -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"Bad.transitions[0]: trigger {name!r} clashes with the attribute MeteredMachine.{name}"
        ),
    ):
        define(_clash(name))


def test_trigger_named_state_fails_naming_the_class() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Bad.transitions[0]: trigger 'state' clashes with the attribute MeteredMachine.state"
        ),
    ):
        define(_clash("state"))


@pytest.mark.parametrize("name", ["states", "transitions", "metric"])
def test_trigger_clashing_with_class_attribute_fails(name: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"Bad: trigger {name!r} clashes")):
        define(_clash(name))


def test_trigger_clashing_with_user_method_fails() -> None:
    def start(self: object) -> None: ...

    with pytest.raises(
        ValueError, match=re.escape("Bad: trigger 'start' clashes with the attribute Bad.start")
    ):
        define({"states": STATES, "transitions": TRANSITIONS, "start": start})


def test_trigger_clashing_with_inherited_user_method_fails() -> None:
    class Base:
        def start(self) -> None: ...

    with pytest.raises(ValueError, match=re.escape("Bad: trigger 'start' clashes")):
        define(bases=(Base, MeteredMachine))


def test_subclass_method_clashing_with_parent_trigger_fails() -> None:
    parent = define(cls_name="Parent")

    async def start(self: object) -> None: ...

    with pytest.raises(ValueError, match=re.escape("Child: trigger 'start' clashes")):
        define({"start": start}, cls_name="Child", bases=(parent,))


def test_generated_is_state_clashing_with_user_method_fails() -> None:
    def is_idle(self: object) -> bool:
        return True

    with pytest.raises(
        ValueError,
        match=re.escape("Bad: generated method 'is_idle' clashes with the attribute Bad.is_idle"),
    ):
        define({"states": STATES, "transitions": TRANSITIONS, "is_idle": is_idle})


def test_generated_may_trigger_clashing_with_user_method_fails() -> None:
    def may_start(self: object) -> bool:
        return True

    with pytest.raises(
        ValueError,
        match=re.escape("Bad: generated method 'may_start' clashes with the attribute"),
    ):
        define({"states": STATES, "transitions": TRANSITIONS, "may_start": may_start})


def test_trigger_clashing_with_generated_is_state_fails() -> None:
    with pytest.raises(ValueError, match=re.escape("Bad: trigger 'is_idle' clashes")):
        define(_transitions(["is_idle", "idle", "running"]))


def test_trigger_clashing_with_generated_may_trigger_fails() -> None:
    with pytest.raises(ValueError, match=re.escape("Bad: trigger 'may_start' clashes")):
        define(_transitions(["start", "idle", "running"], ["may_start", "running", "idle"]))


@pytest.mark.parametrize(
    ("keywords", "error", "message"),
    [
        pytest.param(
            {"unit": "seconds"},
            ValueError,
            "Bad: unit='seconds' is not allowed",
            id="unit",
        ),
        pytest.param(
            {"namespace": "my-app"},
            ValueError,
            "Bad: invalid metric name 'my-app_bad_state'",
            id="namespace-with-dash",
        ),
        pytest.param(
            {"subsystem": "a b"},
            ValueError,
            "Bad: invalid metric name 'a b_bad_state'",
            id="subsystem-with-space",
        ),
        pytest.param(
            {"name": "1st_state"},
            ValueError,
            "Bad: invalid metric name '1st_state'",
            id="name-starting-with-digit",
        ),
        pytest.param(
            {"labelnames": ("bad-label",)},
            ValueError,
            "Bad: invalid label name 'bad-label'",
            id="label-with-dash",
        ),
        pytest.param(
            {"labelnames": ("__reserved",)},
            ValueError,
            "Bad: invalid label name '__reserved'",
            id="reserved-label",
        ),
        pytest.param(
            {"labelnames": ("9lives",)},
            ValueError,
            "Bad: invalid label name '9lives'",
            id="label-starting-with-digit",
        ),
        pytest.param(
            {"labelnames": ("worker", "worker")},
            ValueError,
            "Bad: duplicate label names in ('worker', 'worker')",
            id="duplicate-labels",
        ),
        pytest.param(
            {"labelnames": ("bad_state",)},
            ValueError,
            "Bad: label name 'bad_state' is the state label",
            id="label-is-state-label",
        ),
        pytest.param(
            {"labelnames": ("myapp_bad_state",), "namespace": "myapp"},
            ValueError,
            "Bad: label name 'myapp_bad_state' is the state label",
            id="label-is-full-state-label",
        ),
        pytest.param(
            {"labelnames": "worker"},
            TypeError,
            "Bad: labelnames= must be a sequence of label names, got 'worker'",
            id="labelnames-as-string",
        ),
        pytest.param(
            {"colour": "blue"},
            TypeError,
            "Bad: unknown class keyword(s) colour",
            id="unknown-keyword",
        ),
    ],
)
def test_bad_class_keyword_fails_at_class_creation(
    keywords: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        define(**keywords)


def test_label_named_like_the_bare_metric_name() -> None:
    # prometheus_client's Enum refuses a label equal to its bare name even with a namespace;
    # whether a class accepts it or not, an error must name the class.
    try:
        cls = define(cls_name="Job", namespace="myapp", labelnames=("job_state",))
    except ValueError as exc:
        message = str(exc)
    else:
        message = "Job"
        assert cls.metric_names()[0] == "myapp_job_state"
    assert "Job" in message


def test_subclass_declaring_transitions_without_states_fails() -> None:
    parent = define(cls_name="Parent")
    with pytest.raises(TypeError, match=re.escape("Child declares transitions but no states")):
        define({"transitions": [["finish", "running", "idle"]]}, cls_name="Child", bases=(parent,))


def test_subclass_declaring_initial_without_states_fails() -> None:
    parent = define(cls_name="Parent")
    with pytest.raises(TypeError, match=re.escape("Child declares initial but no states")):
        define({"initial": "running"}, cls_name="Child", bases=(parent,))


def test_metric_names_taken_in_the_registry_fail() -> None:
    registry = CollectorRegistry()
    define(cls_name="Job", registry=registry)
    with pytest.raises(
        ValueError, match=re.escape("Job: its metric names are taken in its registry")
    ):
        define(cls_name="Job", registry=registry)


def test_derived_metric_name_taken_in_the_registry_fails() -> None:
    registry = CollectorRegistry()
    Gauge("job_state_machines", "Something else", registry=registry)
    with pytest.raises(ValueError, match=re.escape("Job: its metric names are taken")):
        define(cls_name="Job", registry=registry)


def test_same_class_name_in_separate_registries_is_fine() -> None:
    first = define(cls_name="Job", registry=CollectorRegistry())
    second = define(cls_name="Job", registry=CollectorRegistry())
    assert first.metric is not second.metric


def test_failed_class_leaves_its_registry_untouched() -> None:
    registry = CollectorRegistry()

    def start(self: object) -> None: ...

    with pytest.raises(ValueError, match="clashes"):
        define({"states": STATES, "transitions": TRANSITIONS, "start": start}, registry=registry)
    assert list(registry.collect()) == []
    define(cls_name="Bad", registry=registry)  # the fixed definition


def test_registry_keyword_registers_the_class_there() -> None:
    registry = CollectorRegistry()
    define(cls_name="Job", registry=registry, labelnames=("worker",))
    assert registry.get_sample_value("job_state_machines", {"job_state": "idle"}) == 0
    assert registry.get_sample_value("job_state_transitions_total", {}) is None
    labels = {"from": "idle", "to": "running", "trigger": "start"}
    assert registry.get_sample_value("job_state_transitions_total", labels) == 0


# -- names and documentation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("class_name", "metric_name"),
    [
        ("Worker", "worker_state"),
        ("HTTPServer", "http_server_state"),
        ("JobQueue", "job_queue_state"),
        ("DBConnection2", "db_connection2_state"),
        ("job", "job_state"),
    ],
)
def test_default_metric_name_is_snake_case_class_name(class_name: str, metric_name: str) -> None:
    cls = define(cls_name=class_name)
    assert cls.metric_names()[0] == metric_name


def test_metric_names_with_prefixes_and_name_keyword() -> None:
    cls = define(cls_name="Worker", namespace="myapp", subsystem="jobs", name="wk")
    assert cls.metric_names() == (
        "myapp_jobs_wk",
        "myapp_jobs_wk_machines",
        "myapp_jobs_wk_transitions_total",
        "myapp_jobs_wk_duration_seconds",
        "myapp_jobs_wk_errors_total",
        "myapp_jobs_wk_oldest_seconds",
        "myapp_jobs_wk_trigger_duration_seconds",
    )
    names = [metric.name for metric in registry_of(cls).collect()]
    # prometheus_client drops a counter's _total suffix from the family name.
    assert names == [
        "myapp_jobs_wk",
        "myapp_jobs_wk_machines",
        "myapp_jobs_wk_transitions",
        "myapp_jobs_wk_duration_seconds",
        "myapp_jobs_wk_errors",
        "myapp_jobs_wk_oldest_seconds",
        "myapp_jobs_wk_trigger_duration_seconds",
    ]


def test_metric_is_the_bound_enum() -> None:
    cls = define(cls_name="Worker", namespace="myapp")
    assert isinstance(cls.metric, Enum)
    enum = next(m for m in registry_of(cls).collect() if m.name == "myapp_worker_state")
    assert enum.type == "stateset"
    assert [s.labels for s in enum.samples] == [{"myapp_worker_state": s} for s in STATES]


def test_default_documentation_is_docstring_first_line() -> None:
    class Worker(MeteredMachine, registry=None):
        """
        Current state of the background worker

        More text that is not the help.
        """

        states = STATES
        transitions = TRANSITIONS

    assert documentation_of(Worker) == "Current state of the background worker"


class Undocumented(MeteredMachine, registry=None):
    states = STATES
    transitions = TRANSITIONS


def test_default_documentation_without_docstring() -> None:
    assert documentation_of(Undocumented) == "State of Undocumented"


def test_default_documentation_of_local_class_names_the_class() -> None:
    class Worker(MeteredMachine, registry=None):
        states = STATES
        transitions = TRANSITIONS

    assert documentation_of(Worker) == "State of Worker"


def test_documentation_keyword_wins() -> None:
    class Worker(MeteredMachine, registry=None, documentation="Given help"):
        """Docstring"""

        states = STATES
        transitions = TRANSITIONS

    assert documentation_of(Worker) == "Given help"


class DocumentedParent(MeteredMachine, abstract=True, registry=None):
    """Parent help"""

    states = STATES
    transitions = TRANSITIONS


class UndocumentedChild(DocumentedParent, registry=None):
    states = STATES
    transitions = TRANSITIONS


def test_subclass_does_not_take_parent_docstring_as_documentation() -> None:
    assert documentation_of(UndocumentedChild) == "State of UndocumentedChild"


# -- introspection ----------------------------------------------------------------------------


class Door(MeteredMachine, registry=None):
    states = ["closed", "open", "locked", "broken"]
    transitions = [
        ["open_", "closed", "open"],
        ["close", "open", "closed"],
        ["lock", "closed", "locked"],
        ["unlock", "locked", "closed"],
        ["smash", ["closed", "locked"], "broken"],
        ["knock", "*", None],
        ["check", "*", "="],
        {"trigger": "repair", "source": "broken", "dest": "closed", "conditions": "fixable"},
        ["lock", "open", "locked"],
    ]
    fixable = True


def test_state_names_and_initial_state() -> None:
    assert Door.state_names() == ("closed", "open", "locked", "broken")
    assert Door.initial_state() == "closed"


def test_explicit_initial_state() -> None:
    cls = define({"states": STATES, "transitions": TRANSITIONS, "initial": "running"})
    assert cls.initial_state() == "running"
    assert cls().state == "running"


def test_trigger_names_in_declaration_order() -> None:
    assert Door.trigger_names() == (
        "open_",
        "close",
        "lock",
        "unlock",
        "smash",
        "knock",
        "check",
        "repair",
    )


def test_transition_table_expands_wildcards_and_source_lists() -> None:
    table = Door.transition_table()
    assert all(isinstance(row, tuple) and len(row) == 3 for row in table)
    assert [tuple(row) for row in table] == [
        ("open_", "closed", "open"),
        ("close", "open", "closed"),
        ("lock", "closed", "locked"),
        ("lock", "open", "locked"),
        ("unlock", "locked", "closed"),
        ("smash", "closed", "broken"),
        ("smash", "locked", "broken"),
        ("knock", "closed", None),
        ("knock", "open", None),
        ("knock", "locked", None),
        ("knock", "broken", None),
        ("check", "closed", "closed"),
        ("check", "open", "open"),
        ("check", "locked", "locked"),
        ("check", "broken", "broken"),
        ("repair", "broken", "closed"),
    ]
    row = table[0]
    assert (row.trigger, row.source, row.dest) == ("open_", "closed", "open")


def test_transitions_counter_lists_every_transition_with_zero() -> None:
    registry = registry_of(Door)
    for trigger, source, dest in Door.transition_table():
        labels = {"from": source, "to": dest or source, "trigger": trigger}
        assert registry.get_sample_value("door_state_transitions_total", labels) == 0


def test_generated_methods_exist() -> None:
    door = Door()
    for trigger in Door.trigger_names():
        assert callable(getattr(door, trigger))
        assert callable(getattr(door, f"may_{trigger}"))
    assert door.is_closed()
    assert not door.is_open()
    assert Door.open_.__name__ == "open_"


def test_auto_transitions_default_off() -> None:
    assert not hasattr(Door, "to_open")
    assert "to_open" not in Door.trigger_names()


@pytest.mark.anyio
async def test_auto_transitions_give_to_state_triggers() -> None:
    class Light(MeteredMachine, registry=None):
        states = ["off", "on", "dim"]
        transitions = [["toggle", "off", "on"]]
        auto_transitions = True

    assert {"to_off", "to_on", "to_dim"} <= set(Light.trigger_names())
    light = Light()
    assert await light.to_dim()
    assert light.state == "dim"
    assert await light.to_off()
    assert light.is_off()
    registry = registry_of(Light)
    labels = {"from": "off", "to": "dim", "trigger": "to_dim"}
    assert registry.get_sample_value("light_state_transitions_total", labels) == 1


# -- abstract classes and subclasses ----------------------------------------------------------


def test_base_class_is_abstract() -> None:
    with pytest.raises(TypeError, match="MeteredMachine is abstract"):
        MeteredMachine()


def test_class_without_states_is_abstract() -> None:
    class Base(MeteredMachine):
        async def on_enter_running(self) -> None: ...

    with pytest.raises(TypeError, match=re.escape("Base is abstract")):
        Base()
    assert Base.metric_names() == ()


def test_abstract_keyword_makes_a_template() -> None:
    class Template(MeteredMachine, abstract=True, registry=None):
        states = STATES
        transitions = TRANSITIONS

    with pytest.raises(TypeError, match=re.escape("Template is abstract")):
        Template()
    assert Template.metric_names() == ()
    assert Template.state_names() == tuple(STATES)


def test_template_is_still_checked() -> None:
    with pytest.raises(ValueError, match=re.escape("Bad.transitions[0]: unknown dest state 'x'")):
        define(_transitions(["start", "idle", "x"]), abstract=True)


def test_template_subclasses_with_states_get_their_own_metrics() -> None:
    class Template(MeteredMachine, abstract=True, registry=None):
        states = STATES
        transitions = TRANSITIONS

    class First(Template, registry=None):
        states = STATES
        transitions = TRANSITIONS

    class Second(Template, registry=None):
        states = ["a", "b"]
        transitions = [["go", "a", "b"]]

    assert First.metric is not Second.metric
    assert First.metric_names()[0] == "first_state"
    assert Second.metric_names()[0] == "second_state"
    assert First().state == "idle"
    assert Second().state == "a"


def test_template_subclasses_without_states_get_their_own_metrics() -> None:
    class Template(MeteredMachine, abstract=True, registry=None):
        states = STATES
        transitions = TRANSITIONS

    class First(Template, registry=None):
        pass

    class Second(Template, registry=None):
        pass

    assert First().state == "idle"
    assert Second().state == "idle"
    assert First.metric is not Second.metric
    assert First.metric_names()[0] == "first_state"
    assert Second.metric_names()[0] == "second_state"


def test_subclass_without_states_reuses_parent_metric() -> None:
    class Parent(MeteredMachine, registry=None):
        states = STATES
        transitions = TRANSITIONS

    class Child(Parent):
        pass

    assert Child.metric is Parent.metric
    assert (
        Child.metric_names()
        == Parent.metric_names()
        == tuple(
            f"parent_state{suffix}"
            for suffix in (
                "",
                "_machines",
                "_transitions_total",
                "_duration_seconds",
                "_errors_total",
                "_oldest_seconds",
                "_trigger_duration_seconds",
            )
        )
    )
    child, parent = Child(), Parent()
    registry = registry_of(Parent)
    assert registry.get_sample_value("parent_state_machines", {"parent_state": "idle"}) == 2
    del child, parent


@pytest.mark.anyio
async def test_subclass_adds_callbacks_without_touching_parent() -> None:
    entered: list[str] = []

    class Parent(MeteredMachine, registry=None):
        states = STATES
        transitions = TRANSITIONS

    class Child(Parent):
        async def on_enter_running(self) -> None:
            entered.append(type(self).__name__)

    parent, child = Parent(), Child()
    assert await parent.start()
    assert entered == []
    assert await child.start()
    assert entered == ["Child"]
    assert await parent.finish()
    assert await parent.start()
    assert entered == ["Child"]
    assert (parent.state, child.state) == ("running", "running")
    registry = registry_of(Parent)
    labels = {"from": "idle", "to": "running", "trigger": "start"}
    assert registry.get_sample_value("parent_state_transitions_total", labels) == 3


def test_subclass_with_class_keywords_gets_its_own_metric() -> None:
    class Parent(MeteredMachine, registry=None):
        states = STATES
        transitions = TRANSITIONS

    class Child(Parent, namespace="myapp", registry=None):
        pass

    assert Child.metric is not Parent.metric
    assert Child.metric_names()[0] == "myapp_child_state"
    assert Child.state_names() == Parent.state_names()
    child = Child()
    assert (
        registry_of(Parent).get_sample_value("parent_state_machines", {"parent_state": "idle"}) == 0
    )
    assert (
        registry_of(Child).get_sample_value(
            "myapp_child_state_machines", {"myapp_child_state": "idle"}
        )
        == 1
    )
    del child


def test_subclass_with_labelnames_gets_its_own_labelled_metric() -> None:
    class Parent(MeteredMachine, registry=None):
        states = STATES
        transitions = TRANSITIONS

    class Child(Parent, labelnames=("worker",), registry=None):
        pass

    assert Child.metric is not Parent.metric
    child = Child(labels={"worker": "w1"})
    registry = registry_of(Child)
    assert registry.get_sample_value("child_state", {"child_state": "idle", "worker": "w1"}) == 1
    with pytest.raises(ValueError, match="labels"):
        Parent(labels={"worker": "w1"})
    del child


def test_wildcard_inside_a_source_list_fails_naming_the_entry() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape("Bad.transitions[0]: unknown source state '*'; states are idle"),
    ):
        define({"states": STATES, "transitions": [["start", ["*", "idle"], "running"]]})


def test_list_transition_takes_prepare_in_eighth_place() -> None:
    cls = define(
        {
            "states": STATES,
            "transitions": [["start", "idle", "running", None, None, None, None, "ready"]],
            "ready": lambda self: None,
        }
    )
    assert cls.transition_table() == (("start", "idle", "running"),)


def test_a_base_class_without_states_passes_its_keywords_down() -> None:
    registry = CollectorRegistry()

    class Base(MeteredMachine, namespace="myapp", labelnames=("worker",), registry=registry):
        pass

    class Pooled(Base):
        states = ["idle", "running"]

    class Named(Base, name="custom_state", subsystem="pool"):
        states = ["idle"]

    with pytest.raises(TypeError, match="abstract"):
        Base()
    assert Pooled.metric_names()[0] == "myapp_pooled_state"
    assert Named.metric_names()[0] == "myapp_pool_custom_state"
    machine = Pooled(labels={"worker": "w1"})
    labels = {"worker": "w1", "myapp_pooled_state": "idle"}
    assert registry.get_sample_value("myapp_pooled_state", labels) == 1
    del machine


def test_an_empty_metric_name_fails() -> None:
    with pytest.raises(ValueError, match=re.escape("Bad: name= must be a non-empty string")):
        define(name="")


# -- what transitions lets through fails here ---------------------------------------------------


def _body(**extra: Any) -> dict[str, Any]:
    return {"states": STATES, "transitions": TRANSITIONS, **extra}


def _ping(*args: Any) -> None:
    """An importable callback, named by its dotted path below."""


MISTAKES = [
    pytest.param(
        _transitions({"trigger": "start", "source": "idle", "dest": "running", "after": "notfy"}),
        "Bad: transition 'start' from 'idle', after: 'notfy' is no method, property, class "
        "attribute or annotation of Bad, nor an importable dotted path",
        id="unknown-after",
    ),
    pytest.param(
        {**_transitions(["start", "idle", "running", "redy"]), "ready": True},
        "Bad: transition 'start' from 'idle', conditions: 'redy' is no method, property, class "
        "attribute or annotation of Bad, nor an importable dotted path; did you mean 'ready'?",
        id="unknown-condition-with-hint",
    ),
    pytest.param(
        _transitions(["start", "*", "running", None, "blocked"]),
        "Bad: transition 'start' from 'idle', unless: 'blocked'",
        id="unknown-unless",
    ),
    pytest.param(
        {"states": ["idle", {"name": "running", "on_exit": "cleanup"}], "transitions": []},
        "Bad: state 'running' on_exit: 'cleanup' is no method",
        id="unknown-state-callback",
    ),
    pytest.param(
        _body(finalize_event=["log_event"]),
        "Bad.finalize_event: 'log_event' is no method",
        id="unknown-machine-callback",
    ),
    pytest.param(
        _body(on_exception="tests.test_definitions._pong"),
        "Bad.on_exception: 'tests.test_definitions._pong' is no method, property, class "
        "attribute or annotation of Bad, nor an importable dotted path",
        id="unknown-dotted-path",
    ),
    pytest.param(
        _body(ordered_transitions={"after": "tick"}),
        "Bad: transition 'next_state' from 'idle', after: 'tick' is no method",
        id="unknown-ordered-callback",
    ),
    pytest.param(
        _body(on_enter_runing=lambda self: None),
        "Bad: Bad.on_enter_runing is for state 'runing', which Bad does not have; states are "
        "idle, running, error; did you mean on_enter_running?",
        id="on-enter-unknown-state",
    ),
    pytest.param(
        _body(on_exit_stopped=lambda self: None),
        "Bad: Bad.on_exit_stopped is for state 'stopped', which Bad does not have",
        id="on-exit-unknown-state",
    ),
    pytest.param(
        {"states": STATES, "transition": TRANSITIONS},
        "Bad.transition is not a definition attribute; did you mean 'transitions'?",
        id="transition",
    ),
    pytest.param(
        {"states": STATES, "transitions": TRANSITIONS, "state": ["idle"]},
        "Bad.state is not a definition attribute; did you mean 'states'?",
        id="state",
    ),
    pytest.param(
        _body(intial="running"),
        "Bad.intial is not a definition attribute; did you mean 'initial'?",
        id="intial",
    ),
    pytest.param(
        _body(on_exeption="handle"),
        "Bad.on_exeption is not a definition attribute; did you mean 'on_exception'?",
        id="on_exeption",
    ),
    pytest.param(
        _body(send_events=True),
        "Bad.send_events is not a definition attribute; did you mean 'send_event'?",
        id="send_events",
    ),
    pytest.param(
        _body(strict=True),
        "Bad: strict = True, and no transition reaches or leaves 'error'; add transitions for "
        "it or remove it from states",
        id="strict-isolated-state",
    ),
    pytest.param(
        _body(strict=True, transitions=[*TRANSITIONS, ["note", "error", None]]),
        "Bad: strict = True, and no transition reaches or leaves 'error'",
        id="strict-internal-transition-only",
    ),
]


@pytest.mark.parametrize(("body", "message"), MISTAKES)
def test_mistakes_transitions_lets_through_fail_at_class_creation(
    body: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        define(body)


class Base(MeteredMachine, abstract=True, registry=None):
    """A template whose callback names its subclasses must declare."""

    states = STATES
    transitions = [{"trigger": "start", "source": "idle", "dest": "running", "after": "notify"}]

    def notify(self) -> None: ...


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"on_enter_stopped": lambda self: None}, "Bad: Bad.on_enter_stopped is for state"),
        ({"finalize_event": "log_it"}, "Bad.finalize_event: 'log_it' is no method"),
        ({"on_exception": 5}, "Bad.on_exception: 5 is neither a method name nor a callable"),
        ({"queued": "yes"}, "Bad.queued must be True or False, got 'yes'"),
        ({"strict": True}, "Bad declares strict but no states"),
        ({"ordered_transitions": True}, "Bad declares ordered_transitions but no states"),
    ],
    ids=["on-enter", "machine-callback", "not-callable", "queued", "strict", "ordered"],
)
def test_subclass_without_states_is_checked_too(extra: dict[str, Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        define(extra, bases=(Base,))


def test_inherited_state_method_for_a_state_the_subclass_lacks_fails() -> None:
    parent = define(_body(on_enter_error=lambda self: None), cls_name="Parent")
    with pytest.raises(ValueError, match=re.escape("Bad: Parent.on_enter_error is for state")):
        define({"states": ["idle", "running"], "transitions": []}, bases=(parent,))


class Named:
    """Carries a property and an annotation, for callbacks that name them."""

    ready: bool

    @property
    def checked(self) -> bool:
        return True


@pytest.mark.parametrize(
    "reference",
    [
        "notify",  # a method
        "checked",  # a property (of a mixin)
        "limit",  # a class attribute
        "ready",  # an annotation alone
        "tests.test_definitions._ping",  # an importable dotted path
        "is_running",  # a generated method
        "may_finish",
    ],
)
def test_callback_names_that_resolve_pass(reference: str) -> None:
    body = {
        "states": STATES,
        "transitions": [
            {"trigger": "start", "source": "idle", "dest": "running", "conditions": reference},
            ["finish", "running", "idle"],
        ],
        "limit": 3,
        "notify": lambda self: None,
    }
    cls = define(body, bases=(MeteredMachine, Named))
    assert cls.trigger_names() == ("start", "finish")


@pytest.mark.parametrize(
    "body",
    [
        # Ordinary attributes near a definition attribute's name, but not of its kind.
        {"status": lambda self: "ok"},
        {"timeout": 5.0},
        {"queue": []},
        {"_states": ["kept", "aside"]},
        {"state_count": 3},
        # Each state of a strict machine is reached or left.
        {"strict": True, "transitions": [*TRANSITIONS, ["fail", "*", "error"]]},
    ],
    ids=["status-method", "timeout-float", "queue-list", "private", "state-count", "strict-ok"],
)
def test_ordinary_attributes_are_not_flagged(body: dict[str, Any]) -> None:
    define({**_body(), **body})


# -- transitions' other ways of declaring states and transitions -----------------------------


class Color(enum.Enum):
    RED = 1
    YELLOW = 2
    GREEN = 3


def test_states_as_an_enum_class_are_named_by_their_members() -> None:
    cls = define({"states": Color, "transitions": [["go", Color.RED, Color.GREEN]]})
    assert cls.state_names() == ("RED", "YELLOW", "GREEN")
    assert cls.transition_table() == (TransitionSpec("go", "RED", "GREEN"),)
    (family,) = cls.metric.collect()
    assert [s.labels["bad_state"] for s in family.samples] == ["RED", "YELLOW", "GREEN"]


def test_states_as_enum_members_with_dicts_and_an_enum_initial() -> None:
    cls = define(
        {
            "states": [Color.RED, {"name": Color.GREEN, "final": True}],
            "transitions": [["go", "RED", Color.GREEN]],
            "initial": Color.GREEN,
        }
    )
    assert cls.state_names() == ("RED", "GREEN")
    assert cls.initial_state() == "GREEN"


class Other(enum.Enum):
    BLUE = 1


@pytest.mark.parametrize(
    "states", [[Color.RED, "GREEN"], [Color.RED, Other.BLUE]], ids=["with-a-name", "two-enums"]
)
def test_states_mixing_enum_members_and_names_fail(states: list[Any]) -> None:
    with pytest.raises(TypeError, match=r"Bad\.states: give every state as a member of one"):
        define({"states": states, "transitions": []})


def test_on_final_on_a_state_that_is_not_final_fails() -> None:
    with pytest.raises(ValueError, match=re.escape("Bad.states[1]: on_final runs when a final")):
        define({"states": ["idle", {"name": "done", "on_final": "cleanup"}], "transitions": []})


def test_final_state_with_on_final_is_accepted() -> None:
    body = {
        "states": ["idle", {"name": "done", "final": True, "on_final": "cleanup"}],
        "transitions": [["finish", "idle", "done"]],
        "cleanup": lambda self: None,
    }
    assert define(body).state_names() == ("idle", "done")


@pytest.mark.parametrize(
    ("ordered", "error", "message"),
    [
        ({"loop": False, "step": 2}, ValueError, "Bad.ordered_transitions: unknown key(s) step"),
        ("next", TypeError, "Bad.ordered_transitions must be True or a dict"),
        ({"trigger": "trigger"}, ValueError, "clashes with the attribute MeteredMachine.trigger"),
        ({"states": ["idle", "gone"]}, ValueError, "unknown state(s) 'gone'"),
        ({"after": ["a", "b"]}, ValueError, "Argument length must be either 1 or the same"),
    ],
    ids=["unknown-key", "not-a-dict", "clash", "unknown-state", "argument-length"],
)
def test_bad_ordered_transitions_fail(ordered: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        define(_body(ordered_transitions=ordered))


ORDERED_STATES = ["a", "b", "c", "d"]


@settings(max_examples=40, deadline=None)
@given(
    options=st.fixed_dictionaries(
        {},
        optional={
            "trigger": st.sampled_from(["next_state", "advance"]),
            "loop": st.booleans(),
            "loop_includes_initial": st.booleans(),
            "states": st.permutations(ORDERED_STATES).flatmap(
                lambda order: st.integers(2, 4).map(lambda n: order[:n])
            ),
        },
    ),
    initial=st.sampled_from(ORDERED_STATES),
    as_true=st.booleans(),
)
def test_ordered_transitions_are_those_transitions_generates(
    options: dict[str, Any], initial: str, as_true: bool
) -> None:
    ordered: Any = True if as_true else options
    reference = Machine(
        states=ORDERED_STATES, initial=initial, auto_transitions=False, ordered_transitions=False
    )
    reference.add_ordered_transitions(**({} if as_true else options))
    expected = tuple(
        TransitionSpec(trigger, source, t.dest)
        for trigger, event in reference.events.items()
        for source, candidates in event.transitions.items()
        for t in candidates
    )
    body = {"states": ORDERED_STATES, "initial": initial, "ordered_transitions": ordered}
    assert define(body).transition_table() == expected


# -- callables are called as given -------------------------------------------------------------


@pytest.mark.anyio
async def test_callables_are_called_as_given_never_copied() -> None:
    class Gate:
        def __init__(self) -> None:
            self.calls = 0

        def __call__(self) -> bool:
            self.calls += 1
            return True

    gate = Gate()
    after = MagicMock()
    cls = define(
        _transitions(
            {"trigger": "start", "source": "idle", "dest": "running", "conditions": gate},
            {"trigger": "finish", "source": "running", "dest": "idle", "after": [after]},
        )
    )
    machine = cls()
    assert await machine.start()
    assert await machine.finish(1, x=2)
    assert gate.calls == 1
    after.assert_called_once_with(1, x=2)
