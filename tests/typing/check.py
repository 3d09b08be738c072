"""Type-check examples/ and the docs' python blocks with mypy --strict and pyright strict.

Run by ``make typecheck-examples`` (part of ``make test``)::

    python tests/typing/check.py [PATH ...]

Each docs page becomes one module (its blocks in order, at their lines in the page, so
that an error's line is the page's line); a block titled with a file name is a module of
its own (``docs_<page>_<file>``), as tests/test_docs.py runs it. mypy runs with the
project's configuration (with the plugin); pyright runs in strict mode. Either checker
failing, or pyright missing, fails the run: there is no silent pass.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.test_docs import blocks  # noqa: E402


def docs_modules(docs: Path, into: Path) -> list[Path]:
    """Write each page's blocks as modules under `into`; return their paths."""
    written = []
    for page in sorted(docs.rglob("*.md")):
        text = page.read_text()
        found = blocks(text)
        if not found:
            continue
        stem = "_".join(page.relative_to(docs).with_suffix("").parts).replace("-", "_")
        lines = [""] * text.count("\n")
        for block in found:
            if block.file is None:
                code = block.code.splitlines()
                lines[block.line - 1 : block.line - 1 + len(code)] = code
            else:  # named after the page too: two pages may both show a worker.py
                own = into / f"docs_{stem}_{block.file}"
                own.write_text(block.code)
                written.append(own)
        # A page redefines names from block to block (each block's main), as a reader's
        # session may; line 1 is the page's title, so the settings take no code line.
        lines[0] = '# mypy: disable-error-code="no-redef"'
        target = into / f"docs_{stem}.py"
        target.write_text("\n".join(lines) + "\n# pyright: reportRedeclaration=false\n")
        written.append(target)
    return written


def run(command: list[str]) -> bool:
    print("$", " ".join(command), flush=True)
    return subprocess.run(command, cwd=ROOT).returncode == 0


def main(arguments: list[str]) -> int:
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="typecheck-") as tmp:
        snippets = Path(tmp) / "docs"
        snippets.mkdir()
        examples = Path(tmp) / "examples"
        examples.mkdir()
        given = [Path(p) for p in arguments] or sorted((ROOT / "examples").glob("*.py"))
        for path in given:  # copied, as pyright checks only files under its project
            shutil.copy(path, examples / path.name)
        paths = [
            *(str(examples / p.name) for p in given),
            *([] if arguments else [str(p) for p in docs_modules(ROOT / "docs", snippets)]),
        ]
        print(f"checking {len(paths)} modules in {tmp} (docs pages as docs/docs_<page>.py)")
        mypy = [str(bin_dir / "mypy"), "--config-file", str(ROOT / "pyproject.toml")]
        mypy_ok = run([*mypy, "--cache-dir", str(Path(tmp) / "mypy-cache"), *paths])
        pyright = shutil.which("pyright", path=str(bin_dir)) or shutil.which("pyright")
        if pyright is None:
            print("pyright is not installed (pip install pyright)", file=sys.stderr)
            return 1
        config = Path(tmp) / "pyrightconfig.json"
        config.write_text(
            json.dumps(
                {
                    "typeCheckingMode": "strict",
                    "pythonVersion": "3.10",
                    "include": [str(Path(p).relative_to(tmp)) for p in paths],
                }
            )
        )
        pyright_ok = run([pyright, "--pythonpath", sys.executable, "--project", str(config)])
    return 0 if mypy_ok and pyright_ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
