"""One async transition (a start/finish loop on one machine): ours, the floor, the anchors."""

from __future__ import annotations

import asyncio
import threading
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable

import anyio
import prometheus_client
from transitions.extensions.asyncio import AsyncMachine

from statemachine_metrics import MeteredMachine
from statemachine_metrics._family import DEFAULT_BUCKETS

from ._harness import Table, interleaved

N = 20_000
SLOW = 2_000  # for contenders that take tens of microseconds a transition
STATES = ["idle", "running"]
TRANSITIONS = [["start", "idle", "running"], ["finish", "running", "idle"]]


class Worker(MeteredMachine, registry=None):
    states = STATES
    transitions = TRANSITIONS


class LabelledWorker(MeteredMachine, registry=None, labelnames=("worker",)):
    states = STATES
    transitions = TRANSITIONS


class CheckedWorker(MeteredMachine, registry=None):
    states = STATES
    transitions = [
        ["start", "idle", "running", "ready", None, "before", "after"],
        ["finish", "running", "idle", "ready", None, "before", "after"],
    ]

    def ready(self) -> bool:
        return True

    def before(self) -> None:
        pass

    def after(self) -> None:
        pass


class HookedWorker(MeteredMachine, registry=None):
    """No transition callbacks, but machine-level ones: every trigger takes the full path."""

    states = STATES
    transitions = TRANSITIONS
    prepare_event = "noop"
    finalize_event = "noop"

    def noop(self) -> None:
        pass


class Floor:
    """A transition written by hand, with the work ours does and nothing else: a dict
    lookup, the state store, live counts, the transition counter, the time-in-state
    histogram's bucket and sum under a lock, the clock and a bisection."""

    def __init__(self, calls: int = 0) -> None:
        self.lock = threading.Lock()
        self.state = 0
        self.entered = time.perf_counter()
        self.counts = [1, 0]
        self.ran = [0, 0]
        self.hist = [[0] * len(DEFAULT_BUCKETS) for _ in STATES]
        self.sums = [0.0, 0.0]
        self.table = {(0, "start"): (1, 0), (1, "finish"): (0, 1)}
        self.calls = calls

    def ready(self) -> bool:
        return True

    def callback(self) -> None:
        pass

    async def fire(self, trigger: str) -> bool:
        dest, slot = self.table[(self.state, trigger)]
        if self.calls and not self.ready():
            return False
        if self.calls:
            self.callback()
        now = time.perf_counter()
        with self.lock:
            source = self.state
            elapsed = now - self.entered
            self.counts[source] -= 1
            self.counts[dest] += 1
            self.ran[slot] += 1
            self.hist[source][bisect_left(DEFAULT_BUCKETS, elapsed)] += 1
            self.sums[source] += elapsed
            self.state = dest
            self.entered = now
        if self.calls:
            self.callback()
        return True


def floor(calls: int = 0) -> Callable[[], Awaitable[None]]:
    async def loop() -> None:
        fire = Floor(calls).fire
        for _ in range(N // 2):
            await fire("start")
            await fire("finish")

    return loop


def ours(cls: type[MeteredMachine], **kwargs: object) -> Callable[[], Awaitable[None]]:
    async def loop() -> None:
        machine = cls(**kwargs)  # type: ignore[arg-type]
        start, finish = machine.start, machine.finish  # type: ignore[attr-defined]
        for _ in range(N // 2):
            await start()
            await finish()

    return loop


async def async_machine(auto_transitions: bool, with_enum: bool = False) -> None:
    class Model:
        pass

    model = Model()
    kwargs: dict[str, object] = {}
    if with_enum:
        enum = prometheus_client.Enum("hand", "d", states=STATES, registry=None)
        kwargs["after_state_change"] = lambda: enum.state(model.state)  # type: ignore[attr-defined]
    AsyncMachine(
        model=model,
        states=STATES,
        transitions=TRANSITIONS,
        initial="idle",
        auto_transitions=auto_transitions,
        **kwargs,
    )
    start, finish = model.start, model.finish  # type: ignore[attr-defined]
    for _ in range(SLOW // 2):
        await start()
        await finish()


async def python_statemachine() -> None:
    from statemachine import State, StateMachine

    class Machine(StateMachine):  # type: ignore[misc]
        idle = State(initial=True)
        running = State()
        start = idle.to(running)
        finish = running.to(idle)

        async def on_enter_state(self) -> None:  # an async callback selects the async engine
            pass

    machine = Machine()
    await machine.activate_initial_state()
    for _ in range(SLOW // 2):
        await machine.start()
        await machine.finish()


def on(backend: str, loop: Callable[[], Awaitable[None]]) -> Callable[[], object]:
    return lambda: anyio.run(loop, backend=backend)


def run() -> Table:
    table = Table("Async transition (start/finish loop, per transition)")
    # transitions' AsyncMachine with our semantics (only declared transitions), and with
    # its default, which adds a to_<state>() trigger per state.
    same = "AsyncMachine auto_transitions=False, asyncio"
    default = "AsyncMachine default (auto_transitions=True), asyncio"
    floor_name = "floor, asyncio"
    floor_calls = "floor + 3 calls, asyncio"
    cases: dict[str, tuple[Callable[[], object], int]] = {
        floor_name: (on("asyncio", floor()), N),
        floor_calls: (on("asyncio", floor(3)), N),
        same: (lambda: asyncio.run(async_machine(False)), SLOW),
        default: (lambda: asyncio.run(async_machine(True)), SLOW),
        "AsyncMachine + Enum in after_state_change, asyncio": (
            lambda: asyncio.run(async_machine(False, with_enum=True)),
            SLOW,
        ),
        "python-statemachine 3, asyncio": (lambda: asyncio.run(python_statemachine()), SLOW),
    }
    for backend in ("asyncio", "trio"):
        cases[f"ours, no callbacks, {backend}"] = (on(backend, ours(Worker)), N)
        cases[f"ours, labelled, {backend}"] = (
            on(backend, ours(LabelledWorker, labels={"worker": "w1"})),
            N,
        )
        cases[f"ours, condition + before + after (sync), {backend}"] = (
            on(backend, ours(CheckedWorker)),
            N,
        )
        cases[f"ours, prepare_event + finalize_event (sync), {backend}"] = (
            on(backend, ours(HookedWorker)),
            N,
        )
    times = interleaved(cases)
    for name, seconds in times.items():
        if name == floor_name:
            table.add(name, seconds)
        elif name == floor_calls:
            table.add(name, seconds, floor_name)
        elif "condition" in name or "prepare_event" in name:
            table.add(name, seconds, floor_calls, same)
        else:
            table.add(name, seconds, floor_name, None if name.startswith("AsyncMachine") else same)
    return table
