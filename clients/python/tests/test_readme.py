"""Every code example of clients/python/README.md (and the Python of the
top-level README.md) runs as written, in README order, against a real
``keyhavend dev`` and, for the SQLAlchemy example, a throwaway PostgreSQL:
each ```python block with this venv's interpreter from an application folder,
each ```sh block with ``sh -e`` and the CLI on PATH. A block must exit 0 and
print what its ``# prints: TEXT`` comments say, line for line. A block that is
not meant to run as it stands is marked ``<!-- readme-test: fragment -->`` on
the line before it (none today)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from .conftest import KEYHAVEN, ROOT, Daemon

RUNNABLE = ("python", "sh")


@dataclass(frozen=True)
class Block:
    file: str
    line: int
    lang: str
    code: str
    marker: Optional[str]


def code_blocks(path: Path) -> List[Block]:
    """The fenced blocks of a Markdown file."""
    lines = path.read_text(encoding="utf-8").split("\n")
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        m = re.fullmatch(r"```(\S*)\s*", lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j] != "```":
            j += 1
        assert j < len(lines), f"{path}:{i + 1}: a code block that never closes"
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        mk = re.fullmatch(r"<!-- readme-test: (.*?) -->", lines[k].strip()) if k >= 0 else None
        blocks.append(
            Block(
                file=str(path.relative_to(ROOT)),
                line=i + 1,
                lang=m.group(1),
                code="\n".join(lines[i + 1 : j]) + "\n",
                marker=mk.group(1) if mk else None,
            )
        )
        i = j + 1
    return blocks


def expected_output(code: str) -> List[str]:
    """What a block says it prints: the TEXT of each ``# prints: TEXT``, in order."""
    return re.findall(r"# prints: (.*)$", code, flags=re.MULTILINE)


BLOCKS = [b for b in code_blocks(ROOT / "clients/python/README.md") if b.lang in RUNNABLE] + [
    b for b in code_blocks(ROOT / "README.md") if b.lang == "python"
]


@dataclass
class App:
    dir: Path
    env: Dict[str, str]
    pg_missing: Optional[str]


@pytest.fixture(scope="module")
def app(daemon: Daemon) -> Iterator[App]:
    folder = Path(tempfile.mkdtemp(prefix="kh-py-readme-"))
    env = {
        **os.environ,
        "KEYHAVEN_SOCKET": daemon.socket,
        "PATH": f"{KEYHAVEN.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    pg = None
    pg_missing: Optional[str] = None
    try:
        # test_orm's throwaway cluster; importing it skips without SQLAlchemy or psycopg.
        from .test_orm import Postgres

        pg = Postgres()
        env["DATABASE_URL"] = pg.url
    except pytest.skip.Exception as e:
        pg_missing = str(e)
    try:
        yield App(folder, env, pg_missing)
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_the_readmes_have_the_examples_this_test_runs() -> None:
    run = [b for b in BLOCKS if b.marker != "fragment"]
    assert len([b for b in run if b.file == "clients/python/README.md" and b.lang == "python"]) >= 4
    assert any(b.file == "README.md" for b in run), "the top-level README has a Python example"
    for b in BLOCKS:
        assert b.marker in (None, "fragment"), f"{b.file}:{b.line}: unknown marker {b.marker}"


# Run in README order (pytest keeps the order of parametrisation).
@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.file}:{b.line}" for b in BLOCKS])
def test_example_runs_as_written(app: App, block: Block) -> None:
    if block.marker == "fragment":
        pytest.skip("marked as a fragment")
    if "DATABASE_URL" in block.code and app.pg_missing:
        pytest.skip(app.pg_missing)
    backup = app.dir / "backup.tar"
    if '"backup.tar"' in block.code:
        # The Sealer example seals a file the user has: make one (1 MiB and a bit).
        backup.write_bytes(os.urandom((1 << 20) + 123))
    if block.lang == "sh":
        cmd = ["/bin/sh", "-e", "-c", block.code]
    else:
        script = app.dir / f"example_{block.line}.py"
        script.write_text(block.code, encoding="utf-8")
        cmd = [sys.executable, str(script)]
    r = subprocess.run(cmd, cwd=app.dir, env=app.env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    if block.lang == "python":
        assert [line for line in r.stdout.split("\n") if line] == expected_output(block.code), r.stderr
    if '"backup.tar"' in block.code:
        assert (app.dir / "restored.tar").read_bytes() == backup.read_bytes()
        assert (app.dir / "backup.tar.khs").stat().st_size > 1 << 20
