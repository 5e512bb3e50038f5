"""`python -m build` makes a wheel and an sdist that install offline from the
files alone (the wheel, and a folder with the wheels of its dependencies)
into a fresh venv, where the package works against a real daemon."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .conftest import Daemon

PKG = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict[str, str] | None = None) -> str:
    p = subprocess.run(list(args), capture_output=True, text=True, check=False, env=env)
    assert p.returncode == 0, f"{args}: {p.stdout}\n{p.stderr}"
    return p.stdout


def test_build_then_install_offline_then_use(daemon: Daemon) -> None:
    with tempfile.TemporaryDirectory(prefix="kh-py-pack-") as tmp:
        dist = Path(tmp, "dist")
        run(sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(PKG))
        wheels = list(dist.glob("keyhaven-0.1.0-py3-none-any.whl"))
        assert wheels and list(dist.glob("keyhaven-0.1.0.tar.gz"))
        names = zipfile.ZipFile(wheels[0]).namelist()
        assert "keyhaven/py.typed" in names and "keyhaven/sealer.py" in names
        assert not any(n.startswith("tests/") for n in names)
        # The dependencies' wheels, fetched once; then nothing but files.
        house = Path(tmp, "wheelhouse")
        run(
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--only-binary=:all:",
            "--dest",
            str(house),
            str(wheels[0]),
        )
        venv = Path(tmp, "venv")
        run(sys.executable, "-m", "venv", str(venv))
        py = str(venv / "bin" / "python")
        run(py, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(house), "keyhaven")
        script = (
            "from keyhaven import Client, OpenLimits, Sealer, SealLimits\n"
            "with Client() as kh:\n"
            "    kh.key_create('acme/app')\n"
            "    ct = kh.encrypt('acme/app', 'from the wheel', {'row': '1'}).ciphertext\n"
            "    a = kh.decrypt(ct, {'row': '1'}).plaintext.decode()\n"
            "with Sealer(seal=SealLimits(1, 10, 1000), open=OpenLimits(1, 10)) as s:\n"
            "    b = s.open(s.seal('acme/app', 'sealed'), None).decode()\n"
            "print(a + '|' + b)\n"
        )
        env = {**os.environ, "KEYHAVEN_SOCKET": daemon.socket}
        out = run(py, "-c", script, env=env)
        assert out.strip() == "from the wheel|sealed"
        # The installed package is where the import came from, not this tree.
        where = run(py, "-c", "import keyhaven; print(keyhaven.__file__)")
        assert str(venv) in where
