"""A transitions `AsyncMachine` worker, and the same worker as a `MeteredMachine`.

`LegacyWorker` is how a service written with transitions declares its job worker: the
model holds the callbacks, and the machine is built around it with machine-level hooks
for logging (`prepare_event`, `finalize_event`), error handling (`on_exception`) and a
final state. `Worker` is the migration: the same states, transitions and hooks become
class attributes, and the class gets Prometheus metrics for free. Both run the same jobs
and keep the same log, which the program prints side by side; then it prints the
metrics. docs/coming-from-transitions.md walks through the changes.

    python examples/migrate_from_transitions.py
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, generate_latest
from transitions.core import EventData as TransitionsEventData
from transitions.extensions.asyncio import AsyncMachine

from statemachine_metrics import EventData, MachineCollector, MeteredMachine, Trigger

# A registry of its own, so that importing this module (as the tests do) never clashes
# with other metrics; a service would use prometheus_client.REGISTRY.
REGISTRY = CollectorRegistry()

# Typed so that both AsyncMachine(states=..., transitions=...) and the class attributes
# of MeteredMachine accept them.
STATES: list[str | dict[str, str | bool]] = [
    "idle",
    "running",
    "error",
    {"name": "retired", "final": True},
]
TRANSITIONS: list[dict[str, str | list[str]]] = [
    {"trigger": "start", "source": "idle", "dest": "running", "conditions": "has_capacity"},
    {"trigger": "finish", "source": "running", "dest": "idle", "after": "count_job"},
    {"trigger": "fail", "source": "running", "dest": "error"},
    {"trigger": "reset", "source": "error", "dest": "idle"},
    {"trigger": "retire", "source": ["idle", "error"], "dest": "retired"},
]


class LegacyWorker:
    """Before: the model of a transitions `AsyncMachine`, built in __init__."""

    # The machine adds the trigger methods to the model; declared for type checkers
    # (annotations only, so nothing stops the machine from binding them).
    start: Callable[..., Awaitable[bool]]
    finish: Callable[..., Awaitable[bool]]
    fail: Callable[..., Awaitable[bool]]
    reset: Callable[..., Awaitable[bool]]
    retire: Callable[..., Awaitable[bool]]

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.done = 0
        self.log: list[str] = []
        self.machine = AsyncMachine(
            model=self,
            states=STATES,
            transitions=TRANSITIONS,
            initial="idle",
            auto_transitions=False,
            prepare_event="note_event",
            finalize_event="note_outcome",
            on_exception="note_error",
            on_final="say_goodbye",
            send_event=True,
        )

    def has_capacity(self, event: TransitionsEventData) -> bool:
        return self.done < self.capacity

    def count_job(self, event: TransitionsEventData) -> None:
        self.done += 1

    async def on_enter_error(self, event: TransitionsEventData) -> None:
        self.log.append("paused after an error")
        await asyncio.sleep(0)

    def note_event(self, event: TransitionsEventData) -> None:
        self.log.append(f"{event.event.name} from {event.state.name}")

    def note_outcome(self, event: TransitionsEventData) -> None:
        self.log.append(f"{event.event.name}: {'ran' if event.result else 'did not run'}")

    def note_error(self, event: TransitionsEventData) -> None:
        error = type(event.error).__name__
        self.log.append(f"{event.event.name} failed: {error}")

    def say_goodbye(self, event: TransitionsEventData) -> None:
        self.log.append(f"retired after {self.done} jobs")


class Worker(MeteredMachine, namespace="myapp", registry=None):
    """Jobs worker, migrated from transitions"""

    # The AsyncMachine(...) arguments, as class attributes under the same names.
    states = STATES
    transitions = TRANSITIONS
    prepare_event = "note_event"
    finalize_event = "note_outcome"
    on_exception = "note_error"
    on_final = "say_goodbye"
    send_event = True
    # Declares, for type checkers, the triggers the table gives the class.
    start: Trigger
    finish: Trigger
    fail: Trigger
    reset: Trigger
    retire: Trigger

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.done = 0
        self.log: list[str] = []

    def has_capacity(self, event: EventData) -> bool:
        return self.done < self.capacity

    def count_job(self, event: EventData) -> None:
        self.done += 1

    async def on_enter_error(self, event: EventData) -> None:
        self.log.append("paused after an error")
        await asyncio.sleep(0)

    def note_event(self, event: EventData) -> None:
        self.log.append(f"{event.event.name} from {event.state.name}")

    def note_outcome(self, event: EventData) -> None:
        self.log.append(f"{event.event.name}: {'ran' if event.result else 'did not run'}")

    def note_error(self, event: EventData) -> None:
        error = type(event.error).__name__
        self.log.append(f"{event.event.name} failed: {error}")

    def say_goodbye(self, event: EventData) -> None:
        self.log.append(f"retired after {self.done} jobs")


REGISTRY.register(MachineCollector(Worker))


async def work(worker: LegacyWorker | Worker) -> list[str]:
    """Two jobs, one that fails, a trigger that is not valid, and retirement."""
    for job_fails in (False, True, False):
        await worker.start()
        if job_fails:
            await worker.fail()
            await worker.reset()
        else:
            await worker.finish()
    await worker.finish()  # not valid in idle: on_exception
    await worker.retire()
    return worker.log


async def main() -> None:
    before = await work(LegacyWorker(capacity=5))
    after = await work(Worker(capacity=5))
    width = max(map(len, before))
    for old, new in zip(before, after):
        print(f"{old:<{width}}  {'==' if old == new else '!='}  {new}")
    print()
    print(generate_latest(REGISTRY).decode(), end="")


if __name__ == "__main__":
    asyncio.run(main())
