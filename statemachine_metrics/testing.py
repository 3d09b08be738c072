"""Testing support: record what machines did, assert it, read their metrics.

    from statemachine_metrics.testing import record

    with record(worker) as recorder:
        await worker.start()
        await worker.finish()
    recorder.assert_path(worker, ["idle", "running", "idle"])

`record` watches transitions only while a recorder is active: with none active, machines
pay nothing for it. `MachineMetrics` reads a class's metric samples by their short names
(``"transitions_total"``) and `reset_metrics` zeroes counters and histograms. The pytest
plugin, loaded automatically, wraps these in the ``machine_recorder`` and
``machine_metrics`` fixtures and resets metric values before each test.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from prometheus_client.utils import floatToGoString

from ._collector import MachineCollector, all_families
from ._events import TransitionEvent
from ._family import Family
from ._machine import MeteredMachine, TransitionSpec

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

    from ._rule_based import MachineRules

M = TypeVar("M", bound=MeteredMachine)

__all__ = [
    "MachineMetrics",
    "RecordedTransition",
    "Recorder",
    "record",
    "reset_metrics",
    "rule_based",
]

#: Recorded transitions listed in a failure message, at most.
_SHOWN = 30


#: One transition that ran, as a recorder saw it: the `TransitionEvent` listeners get.
RecordedTransition = TransitionEvent

# -- the listener --------------------------------------------------------------------------

_lock = threading.Lock()
# The active recorders; replaced whole (under _lock), so the listener reads it without a lock.
_active: tuple[Recorder, ...] = ()


def _listen(event: TransitionEvent) -> None:
    """The one listener of every machine, added while a recorder is active."""
    for recorder in _active:
        if recorder._watches(event.machine):
            recorder.transitions.append(event)


def _activate(recorder: Recorder) -> None:
    global _active
    with _lock:
        if not _active:
            MeteredMachine.add_listener(_listen)
        _active = (*_active, recorder)


def _deactivate(recorder: Recorder) -> None:
    global _active
    with _lock:
        was_active = bool(_active)
        _active = tuple(r for r in _active if r is not recorder)
        if was_active and not _active:
            MeteredMachine.remove_listener(_listen)


# -- recording -----------------------------------------------------------------------------


def record(*targets: MeteredMachine | type[MeteredMachine]) -> Recorder:
    """Record the transitions of `targets` while the ``with`` block runs.

    A target is a machine, or a machine class meaning every instance of it and of its
    subclasses, including instances created while recording. No targets: every machine.
    The recorder is a synchronous context manager, also usable in async code:

        with record(Worker) as recorder:
            worker = Worker(labels={"worker": "w1"})
            await worker.start()
        assert recorder.path(worker) == ["idle", "running"]

    Recorders may be nested and active in several tasks or threads at once; each sees
    every transition of its targets that ran while it was active. The recorder keeps the
    machines it recorded alive until it is dropped.

    Raises:
        TypeError: a target is neither a `MeteredMachine` nor a subclass of it.
    """
    return Recorder(*targets)


class Recorder:
    """The transitions recorded by `record`, and assertions about them.

    ``transitions`` lists every recorded transition in the order they ran (a
    `RecordedTransition` each). A transition that a condition stopped did not run and is
    not recorded.
    """

    __slots__ = ("_classes", "_instances", "_stage", "transitions")

    transitions: list[RecordedTransition]

    def __init__(self, *targets: MeteredMachine | type[MeteredMachine]) -> None:
        classes: list[type[MeteredMachine]] = []
        instances: dict[int, tuple[weakref.ref[MeteredMachine], str]] = {}
        for target in targets:
            if isinstance(target, MeteredMachine):
                instances[id(target)] = (weakref.ref(target), target.state)
            elif isinstance(target, type) and issubclass(target, MeteredMachine):
                classes.append(target)
            else:
                raise TypeError(
                    f"record() takes machines and MeteredMachine classes, not {target!r}"
                )
        self.transitions = []
        self._classes: tuple[type[MeteredMachine], ...] | None = tuple(classes) if targets else None
        # Machines given as targets, by id; their state when recording began.
        self._instances = instances
        self._stage: Literal["new", "recording", "done"] = "new"

    def __enter__(self) -> Recorder:
        if self._stage != "new":
            raise RuntimeError("a recorder records once; call record() again for a new one")
        self._snapshot()
        self._stage = "recording"
        _activate(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stage = "done"
        _deactivate(self)

    @property
    def recording(self) -> bool:
        """True inside the ``with`` block."""
        return self._stage == "recording"

    def clear(self) -> None:
        """Forget what was recorded so far: paths start again from the current states."""
        self._snapshot()
        self.transitions.clear()

    def _snapshot(self) -> None:
        for key, (ref, state) in list(self._instances.items()):
            machine = ref()
            self._instances[key] = (ref, state if machine is None else machine.state)

    def _watches(self, machine: MeteredMachine) -> bool:
        classes = self._classes
        if classes is None or isinstance(machine, classes):
            return True
        target = self._instances.get(id(machine))
        return target is not None and target[0]() is machine

    # -- reading -------------------------------------------------------------------------

    @property
    def machines(self) -> list[MeteredMachine]:
        """The machines that made recorded transitions, in order of their first one."""
        seen: dict[int, MeteredMachine] = {}
        for entry in self.transitions:
            seen.setdefault(id(entry.machine), entry.machine)
        return list(seen.values())

    def transitions_of(self, machine: MeteredMachine) -> list[RecordedTransition]:
        """The recorded transitions of one machine, in order.

        Raises:
            ValueError: this recorder does not watch `machine`.
        """
        self._check_watched(machine)
        return [entry for entry in self.transitions if entry.machine is machine]

    def triggers(self, machine: MeteredMachine) -> list[str]:
        """The triggers that ran on `machine`, in order (internal transitions included)."""
        return [entry.trigger for entry in self.transitions_of(machine)]

    def path(self, machine: MeteredMachine) -> list[str]:
        """The states `machine` went through: its state when recording began, then the
        state after each transition that changed it (reflexive ones included, internal
        ones not). A machine created while recording starts with its initial state.

        Raises:
            ValueError: this recorder does not watch `machine`.
        """
        entries = self.transitions_of(machine)
        path = [self._start(machine, entries)]
        path.extend(entry.dest for entry in entries if not entry.internal)
        return path

    def _start(self, machine: MeteredMachine, entries: Sequence[RecordedTransition]) -> str:
        if entries:
            return entries[0].source
        target = self._instances.get(id(machine))
        if target is not None and target[0]() is machine:
            return target[1]
        # Watched through its class and never moved while recording: where it is now.
        return machine.state

    def uncovered_transitions(self, cls: type[MeteredMachine]) -> list[TransitionSpec]:
        """The transitions of `cls` (as in ``cls.transition_table()``) that no recorded
        instance of `cls` ran: what a test suite has not exercised yet."""
        if not (isinstance(cls, type) and issubclass(cls, MeteredMachine)):
            raise TypeError(f"uncovered_transitions() takes a MeteredMachine class, not {cls!r}")
        ran = {
            (entry.trigger, entry.source, None if entry.internal else entry.dest)
            for entry in self.transitions
            if isinstance(entry.machine, cls)
        }
        return [spec for spec in cls.transition_table() if tuple(spec) not in ran]

    # -- assertions ----------------------------------------------------------------------

    def assert_path(self, machine: MeteredMachine, expected: Sequence[str]) -> None:
        """Assert that `machine` went through exactly the states `expected`, starting with
        the state it had when recording began (see `path`).

        Raises:
            AssertionError: the paths differ; the message shows both, where they diverge,
                and the recorded transitions.
        """
        __tracebackhide__ = True
        expected = _as_names(expected, "assert_path", "state names")
        actual = self.path(machine)
        if actual != expected:
            known = type(machine).state_names()
            raise AssertionError(
                _mismatch("path", machine, expected, actual, " -> ", known, "state")
                + self._listing(machine)
            )

    def assert_triggers(self, machine: MeteredMachine, expected: Sequence[str]) -> None:
        """Assert that exactly the triggers `expected` ran on `machine`, in that order.

        Raises:
            AssertionError: the triggers differ; the message shows both, where they
                diverge, and the recorded transitions.
        """
        __tracebackhide__ = True
        expected = _as_names(expected, "assert_triggers", "trigger names")
        actual = self.triggers(machine)
        if actual != expected:
            known = type(machine).trigger_names()
            raise AssertionError(
                _mismatch("triggers", machine, expected, actual, ", ", known, "trigger")
                + self._listing(machine)
            )

    def assert_no_transitions(self, *machines: MeteredMachine) -> None:
        """Assert that none of `machines` made a transition; with no arguments, that
        nothing was recorded at all.

        Raises:
            AssertionError: listing the transitions that were recorded.
        """
        __tracebackhide__ = True
        if machines:
            for machine in machines:
                self._check_watched(machine)
            ids = {id(machine) for machine in machines}
            made = [entry for entry in self.transitions if id(entry.machine) in ids]
        else:
            made = list(self.transitions)
        if made:
            lines = [f"expected no transitions, {len(made)} recorded:"]
            lines.extend(_entry_lines(made, with_machine=True))
            raise AssertionError("\n".join(lines))

    # -- helpers -------------------------------------------------------------------------

    def _check_watched(self, machine: MeteredMachine) -> None:
        if not isinstance(machine, MeteredMachine):
            raise TypeError(f"expected a machine, got {machine!r}")
        if not self._watches(machine):
            raise ValueError(f"{machine!r} is not recorded here: this recorder {self._targets()}")

    def _targets(self) -> str:
        if self._classes is None:
            return "records every machine"
        names = [f"{cls.__qualname__} machines" for cls in self._classes]
        names.extend(repr(ref()) for ref, _ in self._instances.values() if ref() is not None)
        return "records " + ", ".join(names)

    def _listing(self, machine: MeteredMachine) -> str:
        entries = self.transitions_of(machine)
        if not entries:
            return "\nno transitions of it were recorded"
        return "\nrecorded transitions of it:\n" + "\n".join(_entry_lines(entries))

    def __repr__(self) -> str:
        return f"<Recorder {self._stage}, {len(self.transitions)} transitions; {self._targets()}>"


def _as_names(expected: Sequence[str], function: str, what: str) -> list[str]:
    if isinstance(expected, (str, bytes)) or not isinstance(expected, Iterable):
        raise TypeError(f"{function}() takes a list of {what}, not {expected!r}")
    return list(expected)


def _entry_lines(entries: Sequence[RecordedTransition], with_machine: bool = False) -> list[str]:
    lines = []
    for number, entry in enumerate(entries[:_SHOWN], start=1):
        prefix = f"{entry.machine!r} " if with_machine else ""
        lines.append(f"  {number}. {prefix}{entry}")
    if len(entries) > _SHOWN:
        lines.append(f"  ... and {len(entries) - _SHOWN} more")
    return lines


def _mismatch(
    what: str,
    machine: MeteredMachine,
    expected: list[str],
    actual: list[str],
    separator: str,
    known: Sequence[str],
    kind: str,
) -> str:
    """A failure message: both sequences, aligned, with a caret where they diverge."""
    index = 0
    while index < len(expected) and index < len(actual) and expected[index] == actual[index]:
        index += 1
    column = len(separator.join(actual[:index])) + (len(separator) if index else 0)
    width = max(
        len(expected[index]) if index < len(expected) else 0,
        len(actual[index]) if index < len(actual) else 0,
        1,
    )
    if index < len(expected) and index < len(actual):
        why = f"expected {expected[index]!r}, got {actual[index]!r}"
    elif index < len(expected):
        why = f"expected {expected[index]!r}, but the actual {what} ends there"
    else:
        more = len(actual) - index - 1
        then = f" (then {more} more)" if more else ""
        why = f"expected the end, got {actual[index]!r}{then}"
    lines = [
        f"unexpected {what} of {machine!r}",
        f"  expected: {separator.join(expected) or '(empty)'}",
        f"  actual:   {separator.join(actual) or '(empty)'}",
        "            " + " " * column + "^" * width,
        f"first difference at index {index}: {why}",
    ]
    unknown = [name for name in dict.fromkeys(expected) if name not in known]
    if unknown:
        listed = ", ".join(map(repr, unknown))
        lines.append(
            f"hint: {listed} {'is not a' if len(unknown) == 1 else 'are not'} "
            f"{kind}{'' if len(unknown) == 1 else 's'} of {type(machine).__qualname__}; "
            f"its {kind}s are {', '.join(known)}"
        )
    return "\n".join(lines)


# -- model-based tests ---------------------------------------------------------------------


def rule_based(
    cls: type[M],
    *,
    factory: Callable[[], M | Awaitable[M]] | None = None,
    invariants: Iterable[Callable[[M], object]] = (),
    arguments: Mapping[str, SearchStrategy[Any]] | None = None,
    backend: str = "asyncio",
    backend_options: Mapping[str, Any] | None = None,
) -> type[MachineRules]:
    """A Hypothesis `RuleBasedStateMachine` that fires random triggers at `cls` machines.

    Each example makes a machine with `factory` (default: ``cls()``; it may be async) and
    runs it on an event loop of `backend` (``"asyncio"`` or ``"trio"``, with
    `backend_options`) behind an anyio blocking portal. Each step fires a trigger that the
    transition table allows from the machine's state, or now and then one it does not
    allow, which must raise `MachineError` and change nothing. After the machine is made
    and after every step, it checks that the machine's ``.state`` is what the class's Enum
    series shows for its labels, that ``_machines`` moved by exactly the machine's move,
    and that every ``invariant(machine)`` holds (it may be async; it fails by raising
    `AssertionError` or returning False). At the end of an example, the machine is closed.

    `arguments` maps a trigger to a strategy of its arguments: a tuple of positional ones
    (``st.tuples(st.integers())``) or a dict of keyword ones
    (``st.fixed_dictionaries({"job": st.text()})``).

    A failure lists the example's steps (Hypothesis shrinks it first: the shortest trigger
    sequence that fails), each with the transitions it ran. Run the result with its
    ``TestCase`` under pytest or unittest:

        TestWorker = rule_based(Worker, invariants=[no_job_when_idle]).TestCase
        TestWorker.settings = settings(max_examples=200)

    Needs Hypothesis (``pip install hypothesis``), which the rest of this module does not.

    Raises:
        TypeError: `cls` is not a machine class with metrics; an argument has the wrong
            type.
        ValueError: `cls` declares no transitions; `arguments` names an unknown trigger.
    """
    try:
        from ._rule_based import rule_based as build
    except ModuleNotFoundError as missing:
        if missing.name != "hypothesis":
            raise
        raise ModuleNotFoundError(
            "rule_based() makes Hypothesis tests and needs Hypothesis: pip install hypothesis",
            name="hypothesis",
        ) from None

    return build(
        cls,
        factory=factory,
        invariants=invariants,
        arguments=arguments,
        backend=backend,
        backend_options=backend_options,
    )


# -- metrics -------------------------------------------------------------------------------


def _family(cls: type[MeteredMachine], function: str) -> Family:
    __tracebackhide__ = True
    if not (isinstance(cls, type) and issubclass(cls, MeteredMachine)):
        raise TypeError(f"{function}() takes a MeteredMachine class, not {cls!r}")
    family = cls._family
    if family is None:
        raise TypeError(f"{function}(): {cls.__qualname__} is abstract and has no metrics")
    return family


def reset_metrics(*classes: type[MeteredMachine]) -> None:
    """Zero the counters and histograms of `classes` (transitions, durations, errors), or
    of every machine class when none is given.

    What describes live machines (the state series and the ``_machines`` counts) is not
    reset: it stays true. The pytest plugin calls this before each test.

    Raises:
        TypeError: an argument is not a machine class with metrics.
    """
    __tracebackhide__ = True
    families = [_family(cls, "reset_metrics") for cls in classes] if classes else all_families()
    for family in families:
        family.reset()


class MachineMetrics:
    """Reads a machine class's metric samples without spelling out their full names.

        metrics = MachineMetrics()
        metrics.transitions(Worker, "start")             # start transitions that ran
        metrics.count(Worker, "running")                 # live workers in running
        metrics.state(Worker, worker="w1")               # the state series of w1
        metrics.value(Worker, "duration_seconds_count", state="running")

    Every reading collects the class through `MachineCollector`, as a scrape would. The
    pytest plugin's ``machine_metrics`` fixture is one of these.
    """

    def value(self, cls: type[MeteredMachine], metric: str, /, **labels: object) -> float:
        """The sum of the samples of one of `cls`'s metrics whose labels match `labels`.

        `metric` is the sample name after the class's Enum name: ``"machines"``,
        ``"transitions_total"``, ``"duration_seconds_count"``, ``"duration_seconds_sum"``,
        ``"duration_seconds_bucket"``, ``"errors_total"``, or ``""`` for the Enum itself
        (the full name works too). Labels not given match any value, so
        ``value(Worker, "transitions_total", trigger="fail")`` counts ``fail`` from every
        state. Keyword aliases: ``source`` for ``from`` (a Python keyword), ``dest`` for
        ``to``, ``state`` for the state label (named after the metric); ``error`` may be an
        exception class, ``le`` a number.

        Raises:
            ValueError: unknown metric, label name, state or trigger; the message lists
                what is valid.
        """
        __tracebackhide__ = True
        family = _family(cls, "value")
        sample_name, names = _sample(cls, family, metric)
        wanted = _labels(cls, family, metric, names, labels)
        total = 0.0
        for collected in MachineCollector(cls).collect():
            for sample in collected.samples:
                if sample.name == sample_name and all(
                    sample.labels.get(name) == value for name, value in wanted.items()
                ):
                    total += sample.value
        return total

    def transitions(
        self,
        cls: type[MeteredMachine],
        trigger: str | None = None,
        *,
        source: str | None = None,
        dest: str | None = None,
    ) -> int:
        """How many transitions of `cls` machines ran, optionally only those of one
        trigger, from one state or to one state (an internal transition counts as going
        to its source, as the counter labels it)."""
        __tracebackhide__ = True
        labels = {"trigger": trigger, "from": source, "to": dest}
        given = {name: value for name, value in labels.items() if value is not None}
        return int(self.value(cls, "transitions_total", **given))

    def errors(
        self,
        cls: type[MeteredMachine],
        trigger: str | None = None,
        *,
        error: str | type[BaseException] | None = None,
    ) -> int:
        """How many triggers of `cls` machines raised, optionally only one trigger or one
        exception class (matched by name, as the ``error`` label has it)."""
        __tracebackhide__ = True
        labels: dict[str, object] = {"trigger": trigger, "error": error}
        given = {name: value for name, value in labels.items() if value is not None}
        return int(self.value(cls, "errors_total", **given))

    def count(self, cls: type[MeteredMachine], state: str | None = None) -> int:
        """How many live `cls` machines are in `state` (all states when None), from the
        ``_machines`` gauge."""
        __tracebackhide__ = True
        if state is None:
            return int(self.value(cls, "machines"))
        return int(self.value(cls, "machines", state=state))

    def state(self, cls: type[MeteredMachine], **labels: object) -> str | None:
        """The state the class's Enum shows for the series of `labels` (every label name
        of the class, none for a class without labels); None when no live machine is
        bound to those label values.

        Raises:
            ValueError: `labels` are not exactly the class's label names.
        """
        __tracebackhide__ = True
        family = _family(cls, "state")
        labelnames: tuple[str, ...] = tuple(family.metric._labelnames)
        if set(labels) != set(labelnames):
            expected = ", ".join(labelnames) if labelnames else "none"
            got = ", ".join(sorted(labels)) or "none"
            raise ValueError(
                f"state(): {cls.__qualname__} series are selected by exactly these labels: "
                f"{expected}; got {got}"
            )
        wanted = {name: str(value) for name, value in labels.items()}
        for collected in MachineCollector(cls).collect():
            if collected.name != family.name:
                continue
            for sample in collected.samples:
                if sample.value and all(sample.labels.get(n) == v for n, v in wanted.items()):
                    return sample.labels[family.name]
        return None

    def reset(self, *classes: type[MeteredMachine]) -> None:
        """`reset_metrics`: zero counters and histograms of `classes`, or of all."""
        __tracebackhide__ = True
        reset_metrics(*classes)


_SUFFIXES = (
    "",
    "machines",
    "transitions_total",
    "duration_seconds_bucket",
    "duration_seconds_count",
    "duration_seconds_sum",
    "errors_total",
)


def _sample(cls: type[MeteredMachine], family: Family, metric: str) -> tuple[str, tuple[str, ...]]:
    """The full sample name for `metric`, and its label names."""
    __tracebackhide__ = True
    base = family.name
    suffix = metric
    if metric == base:
        suffix = ""
    elif metric.startswith(base + "_"):
        suffix = metric[len(base) + 1 :]
    state_label = (base,)
    labels: dict[str, tuple[str, ...]] = {
        "": (base, *family.metric._labelnames),
        "machines": state_label,
        "transitions_total": ("from", "to", "trigger"),
        "duration_seconds_bucket": (base, "le"),
        "duration_seconds_count": state_label,
        "duration_seconds_sum": state_label,
        "errors_total": ("trigger", "error"),
    }
    if suffix not in labels:
        hint = ""
        if suffix == "duration_seconds":
            hint = " (a histogram: read its _count, _sum or _bucket)"
        elif suffix in ("transitions", "errors"):
            hint = f" (a counter: read {suffix}_total)"
        valid = ", ".join(repr(s) if s else "'' (the Enum)" for s in _SUFFIXES)
        raise ValueError(
            f"value(): {cls.__qualname__} has no metric {metric!r}{hint}; "
            f"its metrics are {valid} (after {base}_)"
        )
    return (f"{base}_{suffix}" if suffix else base), labels[suffix]


def _labels(
    cls: type[MeteredMachine],
    family: Family,
    metric: str,
    names: tuple[str, ...],
    given: Mapping[str, object],
) -> dict[str, str]:
    """Label selectors with aliases resolved and values checked where they are known."""
    __tracebackhide__ = True
    aliases = {"source": "from", "dest": "to", "state": family.name}
    owner = cls.__qualname__
    wanted: dict[str, str] = {}
    for name, value in given.items():
        label = name if name in names else aliases.get(name, name)
        if label not in names:
            shown = [n if n != family.name else f"{n} (state=)" for n in names]
            shown = [{"from": "from (source=)", "to": "to (dest=)"}.get(n, n) for n in shown]
            raise ValueError(
                f"value(): {owner} {metric or 'Enum'!r} samples have no label {name!r}; "
                f"their labels are {', '.join(shown)}"
            )
        if label == "le" and isinstance(value, (int, float)):
            text = str(floatToGoString(value))
        elif label == "error" and isinstance(value, type):
            text = value.__name__
        else:
            text = str(value)
        valid: Sequence[str] = ()
        if label in (family.name, "from", "to"):
            valid = family.states
        elif label == "trigger":
            valid = cls.trigger_names()
        if valid and text not in valid:
            kind = "trigger" if label == "trigger" else "state"
            raise ValueError(
                f"value(): {text!r} is not a {kind} of {owner}; its {kind}s are {', '.join(valid)}"
            )
        wanted[label] = text
    return wanted
