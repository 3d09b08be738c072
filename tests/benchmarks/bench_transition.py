"""One async transition (a start/finish loop on one machine), ours against the anchors."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import anyio
import prometheus_client
from transitions.extensions.asyncio import AsyncMachine

from statemachine_metrics import MeteredMachine

from ._harness import Table, median_time

N = 20_000
STATES = ["idle", "running"]
TRANSITIONS = [["start", "idle", "running"], ["finish", "running", "idle"]]


class Worker(MeteredMachine, registry=None):
    states = STATES
    transitions = TRANSITIONS


class LabelledWorker(MeteredMachine, registry=None, labelnames=("worker",)):
    states = STATES
    transitions = TRANSITIONS


async def ours(cls: type[MeteredMachine], **kwargs: object) -> None:
    machine = cls(**kwargs)  # type: ignore[arg-type]
    start, finish = machine.start, machine.finish  # type: ignore[attr-defined]
    for _ in range(N // 2):
        await start()
        await finish()


async def floor() -> None:
    """What a transition must cost at least: a dict lookup and an Enum update."""
    enum = prometheus_client.Enum("floor", "d", states=STATES, registry=None)
    table = {("idle", "start"): "running", ("running", "finish"): "idle"}
    state = "idle"

    async def fire(trigger: str) -> bool:
        nonlocal state
        state = table[(state, trigger)]
        enum.state(state)
        return True

    for _ in range(N // 2):
        await fire("start")
        await fire("finish")


async def bare_transitions(with_enum: bool) -> None:
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
        auto_transitions=False,
        **kwargs,
    )
    start, finish = model.start, model.finish  # type: ignore[attr-defined]
    for _ in range(N // 2):
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
    for _ in range(N // 2):
        await machine.start()
        await machine.finish()


def timed(run: Callable[[], Awaitable[None]], backend: str) -> float:
    return median_time(lambda: anyio.run(run, backend=backend), N, repeats=5)


def run() -> Table:
    table = Table("Async transition (start/finish loop, per transition)")
    anchor = "transitions AsyncMachine, asyncio"
    table.add(anchor, median_time(lambda: asyncio.run(bare_transitions(False)), N, repeats=5))
    table.add(
        "AsyncMachine + Enum in after_state_change, asyncio",
        median_time(lambda: asyncio.run(bare_transitions(True)), N, repeats=5),
        anchor,
    )
    table.add(
        "python-statemachine 3, asyncio",
        median_time(lambda: asyncio.run(python_statemachine()), N, repeats=5),
        anchor,
    )
    for backend in ("asyncio", "trio"):
        table.add(f"dict + Enum floor, {backend}", timed(floor, backend), anchor)
        table.add(f"ours, all metrics, {backend}", timed(lambda: ours(Worker), backend), anchor)
        table.add(
            f"ours, labelled, {backend}",
            timed(lambda: ours(LabelledWorker, labels={"worker": "w1"}), backend),
            anchor,
        )
    return table
