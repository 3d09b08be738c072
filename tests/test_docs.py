"""Every ```python block in docs/ runs, page by page, as a reader would paste it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
PAGES = sorted(p for p in DOCS.rglob("*.md") if BLOCK.search(p.read_text()))


def test_docs_have_runnable_pages() -> None:
    assert PAGES, "no docs page has a python block"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_code_runs(page: Path) -> None:
    # Blocks share one namespace, as in a session; what a block registers in the default
    # registry is unregistered after it, so that two blocks may show the same metric name.
    namespace: dict[str, object] = {"__name__": f"docs.{page.stem}"}
    for number, block in enumerate(BLOCK.findall(page.read_text()), start=1):
        before = set(REGISTRY._collector_to_names)
        try:
            exec(compile(block, f"{page.name}[block {number}]", "exec"), namespace)
        finally:
            for collector in set(REGISTRY._collector_to_names) - before:
                REGISTRY.unregister(collector)


def test_readme_example_prints_what_it_shows(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (DOCS.parent / "README.md").read_text()
    (code,) = BLOCK.findall(readme)
    shown = re.search(r"```text\n(.*?)```", readme, re.DOTALL)
    assert shown is not None
    before = set(REGISTRY._collector_to_names)
    try:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    finally:
        for collector in set(REGISTRY._collector_to_names) - before:
            REGISTRY.unregister(collector)
    printed = capsys.readouterr().out
    for line in shown.group(1).splitlines():
        assert line in printed
