"""`MeteredMachine.mermaid()`: Mermaid state diagrams of machine classes."""

from __future__ import annotations

import gc
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from statemachine_metrics import MeteredMachine


class Worker(MeteredMachine, namespace="diagram", registry=None):
    """Current state of the background worker"""

    states = ["idle", "running", "error"]
    transitions = [
        ["start", "idle", "running"],
        ["finish", "running", "idle"],
        ["fail", ["idle", "running"], "error"],
        {"trigger": "reset", "source": "error", "dest": "idle"},
    ]


def test_small_machine_exact_text() -> None:
    assert Worker.mermaid() == (
        "stateDiagram-v2\n"
        "[*] --> idle\n"
        "idle --> running : start\n"
        "running --> idle : finish\n"
        "idle --> error : fail\n"
        "running --> error : fail\n"
        "error --> idle : reset"
    )


def test_wildcard_internal_reflexive_and_duplicates() -> None:
    class Job(MeteredMachine, registry=None):
        states = ["queued", "running", "done"]
        initial = "running"
        ok = True
        transitions = [
            ["cancel", "*", "done"],
            ["heartbeat", "running", None],  # internal: drawn as a self-loop
            ["restart", "running", "="],  # reflexive
            {"trigger": "finish", "source": "running", "dest": "done", "conditions": "ok"},
            {"trigger": "finish", "source": "running", "dest": "done"},
        ]

    assert Job.mermaid().splitlines() == [
        "stateDiagram-v2",
        "[*] --> running",
        "queued --> done : cancel",
        "running --> done : cancel",
        "done --> done : cancel",
        "running --> running : heartbeat",
        "running --> running : restart",
        "running --> done : finish",
    ]


def test_odd_state_names_are_declared_with_ids() -> None:
    class Odd(MeteredMachine, registry=None):
        states = ["waiting for input", "end", "re-try", "café", "state", "s_re_try", 'say "hi"']
        transitions = [
            ["go", "waiting for input", "re-try"],
            ["again", "re-try", "s_re_try"],
            ["stop", ["s_re_try", "café"], "end"],
            ["talk", "state", 'say "hi"'],
        ]

    assert Odd.mermaid().splitlines() == [
        "stateDiagram-v2",
        "[*] --> s_waiting_for_input",
        "s_waiting_for_input --> s_re_try_2 : go",
        "s_re_try_2 --> s_re_try : again",
        "s_re_try --> s_end : stop",
        "s_caf --> s_end : stop",
        "s_state --> s_say_hi : talk",
        'state "waiting for input" as s_waiting_for_input',
        'state "end" as s_end',
        'state "re-try" as s_re_try_2',
        'state "café" as s_caf',
        'state "state" as s_state',
        'state "say #34;hi#34;" as s_say_hi',
    ]


def test_ids_fall_back_to_the_state_index() -> None:
    class Symbols(MeteredMachine, registry=None):
        states = ["→", "←", "direction"]
        transitions = [["flip", "→", "←"], ["turn", "←", "direction"]]

    text = Symbols.mermaid()
    assert 'state "→" as s0' in text
    assert 'state "←" as s1' in text
    assert 'state "direction" as s2' in text
    assert "s0 --> s1 : flip" in text


def test_labels_keep_what_mermaid_would_drop_or_misread() -> None:
    # Mermaid trims labels, drops a leading colon, reads "direction TB" as a statement and
    # "%%" as a comment: those characters are written as entity codes.
    class Tricky(MeteredMachine, registry=None):
        states = [" padded ", ":colon", "direction TB", "50%%", "a\tb", "<b>&"]

    assert Tricky.mermaid().splitlines()[2:] == [
        'state "#32;padded#32;" as s_padded',
        'state "#58;colon" as s_colon',
        'state "direction#32;TB" as s2',
        'state "50#37;#37;" as s_50',
        'state "a#9;b" as s_a_b',
        'state "#60;b#62;#38;" as s_b',
    ]


def test_trigger_ending_in_direction_keeps_ids_off_direction_words() -> None:
    # "a --> tbx : set_direction" followed by a line starting "tbx" reads as "direction TB".
    class Turn(MeteredMachine, registry=None):
        states = ["a", "tbx", "lr"]
        transitions = [["set_direction", "a", "tbx"], ["go", "tbx", "a"]]

    class Calm(MeteredMachine, registry=None):
        states = ["a", "tbx"]
        transitions = [["go", "a", "tbx"]]

    assert Turn.mermaid().splitlines()[2:] == [
        "a --> s_tbx : set_direction",
        "s_tbx --> a : go",
        'state "tbx" as s_tbx',
        'state "lr" as s_lr',
    ]
    assert "a --> tbx : go" in Calm.mermaid()


def test_isolated_state_is_listed() -> None:
    class Lonely(MeteredMachine, registry=None):
        states = ["a", "b", "parked"]
        transitions = [["go", "a", "b"]]

    assert Lonely.mermaid().splitlines()[-1] == "parked"


def test_counts_show_live_machines_per_state() -> None:
    class Counted(MeteredMachine, registry=None, labelnames=("n",)):
        states = ["idle", "busy", "odd one"]
        transitions = [["go", "idle", "busy"]]

    machines = [Counted(labels={"n": str(i)}) for i in range(3)]
    machines.append(Counted(labels={"n": "x"}, initial="busy"))
    machines.append(Counted(labels={"n": "y"}, initial="odd one"))
    lines = Counted.mermaid(counts=True).splitlines()
    assert lines[:3] == ["stateDiagram-v2", "[*] --> idle", "idle --> busy : go"]
    assert lines[3:] == [
        'state "idle (3)" as idle',
        'state "busy (1)" as busy',
        'state "odd one (1)" as s_odd_one',
    ]
    del machines[0:2]
    gc.collect()
    assert 'state "idle (1)" as idle' in Counted.mermaid(counts=True)


@pytest.mark.anyio
async def test_counts_follow_transitions_and_close(anyio_backend: str) -> None:
    class Flow(MeteredMachine, registry=None):
        states = ["a", "b"]
        transitions = [["go", "a", "b"]]

    first, second = Flow(), Flow()
    await first.go()
    assert Flow.mermaid(counts=True).splitlines()[-2:] == [
        'state "a (1)" as a',
        'state "b (1)" as b',
    ]
    await first.aclose()
    await second.aclose()
    assert Flow.mermaid(counts=True).splitlines()[-2:] == [
        'state "a (0)" as a',
        'state "b (0)" as b',
    ]


def test_subclass_shares_parent_diagram_and_counts() -> None:
    class Child(Worker):
        async def on_enter_error(self) -> None:
            pass

    machine = Child(initial="error")
    assert Child.mermaid() == Worker.mermaid()
    assert 'state "error (1)" as error' in Worker.mermaid(counts=True)
    del machine


def test_abstract_classes() -> None:
    class NoStates(MeteredMachine):
        pass

    class Template(MeteredMachine, abstract=True, registry=None):
        states = ["a", "b"]
        transitions = [["go", "a", "b"]]

    with pytest.raises(TypeError, match="NoStates"):
        NoStates.mermaid()
    assert Template.mermaid().splitlines()[1:] == ["[*] --> a", "a --> b : go"]
    with pytest.raises(TypeError, match="Template is abstract"):
        Template.mermaid(counts=True)


_LINE = re.compile(
    r"stateDiagram-v2|\[\*\] --> (?P<init>\w+)|(?P<src>\w+) --> (?P<dst>\w+) : (?P<trig>\w+)"
    r'|state "(?P<label>[^"\n]*)" as (?P<id>\w+)'
)
_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=8)


@given(
    states=st.lists(
        _names.filter(lambda s: s not in ("*", "=")), min_size=1, max_size=6, unique=True
    ),
    data=st.data(),
)
def test_any_state_names_give_a_well_formed_diagram(states: list[str], data: st.DataObject) -> None:
    pairs = data.draw(
        st.lists(st.tuples(st.sampled_from(states), st.sampled_from(states)), max_size=8)
    )
    definition = {
        "states": states,
        "transitions": [[f"t{i}", src, dst] for i, (src, dst) in enumerate(pairs)],
    }
    cls = type("Any", (MeteredMachine,), definition, registry=None)
    text = cls.mermaid(counts=True)
    lines = text.splitlines()
    matches = [_LINE.fullmatch(line) for line in lines]
    assert lines[0] == "stateDiagram-v2"
    assert all(matches), text
    labels = {m["id"]: m["label"] for m in matches if m and m["id"]}
    names = {
        id_: re.sub(r"#(\d+);", lambda n: chr(int(n[1])), label).removesuffix(" (0)")
        for id_, label in labels.items()
    }
    assert sorted(names.values()) == sorted(states)  # one id per state, labels decode back
    edges = [(names[m["src"]], names[m["dst"]], m["trig"]) for m in matches if m and m["src"]]
    assert edges == [(src, dst, f"t{i}") for i, (src, dst) in enumerate(pairs)]
    initial = next(m["init"] for m in matches if m and m["init"])
    assert names[initial] == states[0]
