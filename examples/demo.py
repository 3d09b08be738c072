"""A background worker whose state is served on http://127.0.0.1:8000/metrics.

Run with ``make demo``; stop with Ctrl-C.
"""

from __future__ import annotations

import argparse
import random
import time

from prometheus_client import start_http_server

from statemachine_metrics import Enum

WORKER_STATE = Enum(
    "worker_state",
    "Current state of the background worker",
    states=["idle", "running", "error"],
    namespace="myapp",
)


def process_job() -> None:
    WORKER_STATE.state("running")
    try:
        time.sleep(random.uniform(0.2, 1.0))
        if random.random() < 0.1:
            raise RuntimeError("job failed")
    except Exception:
        WORKER_STATE.state("error")
        time.sleep(0.5)
    finally:
        WORKER_STATE.state("idle")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    start_http_server(args.port, addr=args.host)
    print(f"serving metrics on http://{args.host}:{args.port}/metrics (Ctrl-C stops)")
    try:
        while True:
            process_job()
            time.sleep(random.uniform(0.1, 0.5))
    except KeyboardInterrupt:
        print("stopped")


if __name__ == "__main__":
    main()
