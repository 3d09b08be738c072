"""Every ```python block in docs/ runs, page by page, the way a reader uses it.

How a page is run:

- Each page runs in a fresh interpreter of its own. Its ```python blocks run in order in
  one namespace, as if a reader pasted them one after the other into one session: nothing
  is cleaned up between blocks. So a page cannot declare the same machine class twice in
  the default registry, as a reader's program could not.
- A block whose fence gives it a file name as title is a program of its own:

      ```python title="worker.py"
      ...
      ```

  The page shows the title above the block, so a reader sees it is a separate file. The
  test saves the block under that name and imports it in yet another fresh interpreter
  (so its ``if __name__ == "__main__":`` part does not run); the blocks around it go on
  as if it were not there. Use it for a complete program a reader saves and runs, never
  to hide a clash between blocks of one page.
- The page's namespace is a module's, not ``__main__``: its ``if __name__ ==
  "__main__":`` parts show how a program starts, and do not run.
- Only ```python blocks run. Shell sessions, output and configuration use ```console,
  ```text, ```sh, ```yaml and so on; a block of Python that is not meant to run on its
  own must say so on the page and link to a complete version that does run.

A failure names the page and the line of the block that raised, with the traceback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```python(?P<attrs>[^\n`]*)\n(?P<code>.*?)^```[ \t]*$", re.S | re.M)
TITLE = re.compile(r'\btitle="(?P<title>[^"]*)"')
STANDALONE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\.py")


@dataclass(frozen=True)
class Block:
    line: int  # of the block's first code line in the page
    code: str
    file: str | None  # a standalone program's file name


def blocks(text: str) -> list[Block]:
    found = []
    for match in FENCE.finditer(text):
        title = TITLE.search(match["attrs"])
        name = title["title"] if title else None
        if name is not None and not STANDALONE_NAME.fullmatch(name):
            name = None  # a title that is not a file name is only a caption
        line = text.count("\n", 0, match.start("code")) + 1
        found.append(Block(line, match["code"], name))
    return found


PAGES = sorted(p for p in DOCS.rglob("*.md") if blocks(p.read_text()))

# Runs in the fresh interpreter: the blocks, in order, in one namespace. Each block is
# compiled under the page's path, padded so that traceback lines are the page's lines.
RUNNER = textwrap.dedent(
    """
    import json, sys
    page, blocks = json.load(sys.stdin)
    namespace = {"__name__": "docs_page"}
    for line, code in blocks:
        exec(compile("\\n" * (line - 1) + code, page, "exec"), namespace)
    """
)


def run_python(args: list[str], cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "error"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return subprocess.run(
        [sys.executable, *args],
        input=stdin,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_docs_have_runnable_pages() -> None:
    assert PAGES, "no docs page has a python block"


def test_fences_are_read_as_documented() -> None:
    page = (
        "```python\nx = 1\n```\n\n"
        '```python title="worker.py"\nimport anyio\n```\n\n'
        '```python title="An example"\ny = 2\n```\n'
        "```py\nnot run\n```\n"
    )
    assert blocks(page) == [
        Block(2, "x = 1\n", None),
        Block(6, "import anyio\n", "worker.py"),
        Block(10, "y = 2\n", None),
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_code_runs(page: Path, tmp_path: Path) -> None:
    shown = str(page.relative_to(ROOT))
    together = [(b.line, b.code) for b in blocks(page.read_text()) if b.file is None]
    result = run_python(["-c", RUNNER], tmp_path, json.dumps([str(page), together]))
    if result.returncode != 0:
        pytest.fail(f"{shown}: a block failed\n{result.stderr}", pytrace=False)
    for block in blocks(page.read_text()):
        if block.file is None:
            continue
        where = tmp_path / block.file.removesuffix(".py")
        where.mkdir()
        (where / block.file).write_text(block.code)
        result = run_python(["-c", f"import {block.file.removesuffix('.py')}"], where)
        if result.returncode != 0:
            pytest.fail(f"{shown}:{block.line}: {block.file} fails\n{result.stderr}", pytrace=False)


def test_tutorial_worker_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    """The tutorial's worker.py, run as a program, ends quietly on Ctrl-C."""
    (program,) = [b for b in blocks((DOCS / "tutorial.md").read_text()) if b.file == "worker.py"]
    (tmp_path / "worker.py").write_text(program.code)
    # The program as written, but serving on a free port: port 8000 may be taken here.
    driver = textwrap.dedent(
        """
        import runpy, sys, prometheus_client
        serve = prometheus_client.start_http_server
        def on_a_free_port(port, *args, **kwargs):
            found = serve(0, *args, **kwargs)
            print("serving", flush=True)
            return found
        prometheus_client.start_http_server = on_a_free_port
        runpy.run_path("worker.py", run_name="__main__")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "error"}
    with subprocess.Popen(
        [sys.executable, "-c", driver],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        try:
            assert proc.stdout.readline() == "serving\n"
            # Let anyio.run start and a few jobs go through.
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=10)
        finally:
            proc.kill()
    assert proc.returncode == 0, err
    assert err == ""
    assert out.strip().splitlines()[-1] == "stopped"


def test_readme_example_prints_what_it_shows(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    (code,) = [b.code for b in blocks(readme)]
    shown = re.search(r"^```text\n(.*?)^```$", readme, re.S | re.M)
    assert shown is not None
    (tmp_path / "example.py").write_text(code)
    result = run_python(["example.py"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == shown[1]
