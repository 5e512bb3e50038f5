"""A real keyhavend in dev mode (its own SoftHSM2 token, store and socket in
a temporary folder) per test module, stopped after it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[3]
KEYHAVEND = ROOT / "target" / "debug" / "keyhavend"
KEYHAVEN = ROOT / "target" / "debug" / "keyhaven"


class Daemon:
    def __init__(self, dir: Optional[str] = None) -> None:
        """Start a dev daemon; ``dir`` reuses the install of an earlier one (a restart)."""
        self.dir = dir or tempfile.mkdtemp(prefix="kh-py-")
        self.proc = subprocess.Popen(
            [str(KEYHAVEND), "dev", "--dir", os.path.join(self.dir, "dev")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.stderr: List[bytes] = []
        threading.Thread(target=self._drain, daemon=True).start()
        self.socket = self._wait_ready()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def _wait_ready(self) -> str:
        assert self.proc.stdout is not None
        found: List[Optional[str]] = [None]

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                m = re.match(rb"export KEYHAVEN_SOCKET=(\S+)", line)
                if m:
                    found[0] = m.group(1).decode()
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(60)
        if found[0] is None:
            self.stop()
            raise RuntimeError("keyhavend did not start:\n" + b"".join(self.stderr).decode(errors="replace"))
        return found[0]

    def cli(self, *args: str, input: Optional[bytes] = None) -> bytes:
        """Run the Rust CLI against this daemon."""
        return subprocess.run(
            [str(KEYHAVEN), "--socket", self.socket, *args], input=input, capture_output=True, check=True
        ).stdout

    def stop(self, keep: bool = False) -> None:
        """Stop it; ``keep`` leaves its folder for a restart."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    d = Daemon()
    try:
        yield d
    finally:
        d.stop()
