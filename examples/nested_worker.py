"""A crawler whose `running` state nests the steps of a page: fetching, parsing, saving.

`running` is a compound state: `start` enters it, and so its initial child `fetching`;
`fail` is declared once on `running` and applies in each of its children. The machine's
metrics list the states by full name (`running_fetching`, ...), and the program prints
the path of each crawler, the Mermaid diagram and the exposition, with the PromQL that
sums a compound state. docs/nested-states.md explains it.

    python examples/nested_worker.py
    python examples/nested_worker.py --backend trio
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import anyio
from prometheus_client import CollectorRegistry, generate_latest

from statemachine_metrics import MachineCollector, MeteredMachine, Trigger

# A registry of its own, so that importing this module (as the tests do) never clashes
# with other metrics; a service would use prometheus_client.REGISTRY.
REGISTRY = CollectorRegistry()


class Crawler(MeteredMachine, namespace="myapp", labelnames=("crawler",), registry=None):
    """Current state of the crawler"""

    states = [
        "idle",
        {
            "name": "running",
            "initial": "fetching",
            "on_enter": "clock_in",
            "on_exit": "clock_out",
            "children": ["fetching", "parsing", "saving"],
        },
        "failed",
    ]
    start = Trigger("idle", "running")
    parse = Trigger("running_fetching", "running_parsing")
    save = Trigger("running_parsing", "running_saving")
    done = Trigger("running_saving", "idle")
    fail = Trigger("running", "failed")  # from any child of running
    retry = Trigger("failed", "running")

    def __init__(self, name: str) -> None:
        super().__init__(labels={"crawler": name})
        self.shifts = 0

    def clock_in(self) -> None:
        self.shifts += 1

    def clock_out(self) -> None:
        pass


REGISTRY.register(MachineCollector(Crawler))


async def crawl(crawler: Crawler, pages: Sequence[str]) -> list[str]:
    """Crawl `pages`, failing (and retrying once) on the ones named "broken"."""
    path = [crawler.state]
    for page in pages:
        await crawler.start()
        path.append(crawler.state)
        await crawler.parse()
        path.append(crawler.state)
        if page == "broken":
            await crawler.fail()
            path.append(crawler.state)
            await crawler.retry()
            path.append(crawler.state)
            await crawler.parse()
            path.append(crawler.state)
        await crawler.save()
        path.append(crawler.state)
        await crawler.done()
        path.append(crawler.state)
    return path


async def main() -> tuple[dict[str, list[str]], str]:
    """Crawl with two crawlers; their paths, and the exposition before they close."""
    crawlers = [Crawler("c1"), Crawler("c2")]
    jobs = [["home", "about"], ["home", "broken"]]
    paths: dict[str, list[str]] = {}

    async def run(crawler: Crawler, pages: Sequence[str]) -> None:
        paths[crawler.labels["crawler"]] = await crawl(crawler, pages)

    async with anyio.create_task_group() as tg:
        for crawler, pages in zip(crawlers, jobs):
            tg.start_soon(run, crawler, pages)
    exposition = generate_latest(REGISTRY).decode()
    for crawler in crawlers:
        await crawler.aclose()
    return paths, exposition


def cli(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args(argv)
    paths, exposition = anyio.run(main, backend=args.backend)
    for name, path in paths.items():
        print(f"{name}: {' -> '.join(path)}")
    print()
    print(Crawler.mermaid())
    print()
    print(exposition, end="")
    print()
    print("# time in running, any step:")
    print('#   sum(myapp_crawler_state_machines{myapp_crawler_state=~"running_.*"})')


if __name__ == "__main__":
    cli()
