"""Machines that get stuck, and the alert that says so: `stuck_after`.

An upload pool in which one upload hangs forever. The `Upload` class says how long a
machine may stay in a state before it counts as stuck; the command line turns that into
Prometheus alerts and a Grafana dashboard (docs/alerts-and-dashboards.md explains them):

    python examples/stuck_worker.py --port 8001     # serves /metrics; one upload hangs
    python -m statemachine_metrics rules examples.stuck_worker > rules.yml
    python -m statemachine_metrics dashboard examples.stuck_worker > dashboard.json

While it runs, http://127.0.0.1:8001/metrics shows the hanging upload's age climbing in
``shop_upload_state_oldest_seconds{shop_upload_state="uploading"}``: the series the
generated ``UploadStuck`` alert reads. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import contextlib
import random
from collections.abc import Callable, Sequence

import anyio
from prometheus_client import CollectorRegistry

from statemachine_metrics import MachineCollector, MeteredMachine, serve_metrics

# A registry of its own, so that importing this module (as the tests and the command line
# do) never clashes with other metrics; a service would use prometheus_client.REGISTRY.
REGISTRY = CollectorRegistry()


class Upload(MeteredMachine, namespace="shop", labelnames=("uploader",), registry=None):
    """State of an uploader"""

    states = ["idle", "uploading", "failed"]
    transitions = [
        ["upload", "idle", "uploading"],
        ["done", "uploading", "idle"],
        ["fail", "uploading", "failed"],
        ["retry", "failed", "idle"],
    ]
    # Ten minutes in `uploading` is stuck: UploadStuck fires, with state="uploading".
    stuck_after = {"uploading": 600.0}
    # A failed uploader rests, then its timer retries; UploadTimeoutNotFired fires when a
    # machine stays in `failed` long past that.
    timeouts = {"failed": (2.0, "retry")}


REGISTRY.register(MachineCollector(Upload))


async def uploader(name: str, upload_seconds: Callable[[], float]) -> None:
    """Upload forever; a failed upload leaves the uploader in `failed` until its timer."""
    async with Upload(labels={"uploader": name}) as machine:
        tracked = machine.track(enter="upload", success="done", error="fail")
        while True:
            if machine.state == "failed":
                await anyio.sleep(0.05)  # the timeout brings it back to idle
                continue
            try:
                async with tracked:
                    seconds = upload_seconds()
                    if seconds < 0:
                        raise OSError("connection reset")
                    await anyio.sleep(seconds)
            except OSError:
                pass


async def run(
    port: int = 8001,
    uploaders: int = 3,
    seconds: float | None = None,
    started: Callable[[int], None] = print,
) -> None:
    """Serve the metrics and run the pool (for `seconds`, or until cancelled). Uploader
    ``u0`` hangs in its first upload; the others finish theirs or fail now and then."""
    rng = random.Random(1)
    async with anyio.create_task_group() as tg:
        bound = await tg.start(serve_metrics, port, "127.0.0.1", REGISTRY)
        started(bound)
        tg.start_soon(uploader, "u0", lambda: float("inf"))  # hangs: never returns
        for i in range(1, uploaders):
            tg.start_soon(uploader, f"u{i}", lambda: -1.0 if rng.random() < 0.1 else 0.2)
        if seconds is not None:
            await anyio.sleep(seconds)
            tg.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=8001, help="where /metrics is served")
    args = parser.parse_args(argv)

    def started(port: int) -> None:
        print(f"serving http://127.0.0.1:{port}/metrics; uploader u0 is stuck; Ctrl-C stops")

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: stop quietly
        anyio.run(run, args.port, 3, None, started)


if __name__ == "__main__":
    main()
