"""Fixtures for driving a real `cleanroom serve` process from Python ADBC."""

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cleanroom_binary() -> Path:
    """The `cleanroom` binary built by `cargo test` (or named by CLEANROOM_BIN)."""
    if os.environ.get("CLEANROOM_BIN"):
        return Path(os.environ["CLEANROOM_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    binary = target / "debug" / "cleanroom"
    if not binary.exists():
        pytest.exit(f"{binary} not found: build it with `cargo build` first", returncode=2)
    return binary


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adbench")
    subprocess.run(
        [str(cleanroom_binary()), "generate", "--sf", "0.01", "--seed", "11", "--quiet", "--out", str(out)],
        check=True,
    )
    return out


def credentials(demo: Path) -> dict:
    passwords = {}
    party = None
    for line in (demo / "credentials.toml").read_text().splitlines():
        line = line.strip()
        m = re.match(r"\[parties\.(\w+)\]", line)
        if m:
            party = m.group(1)
        elif line.startswith("password") and party:
            passwords[party] = line.split("=", 1)[1].strip().strip('"')
    return passwords


class Server:
    def __init__(self, demo: Path, state_dir: Path, manifest: Path = None, args=()):
        self.log = state_dir.with_suffix(".log")
        self.proc = subprocess.Popen(
            [
                str(cleanroom_binary()), "serve",
                "--manifest", str(manifest or demo / "manifest.toml"),
                "--listen", "127.0.0.1:0",
                "--state-dir", str(state_dir),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=open(self.log, "w"),
            text=True,
        )
        deadline = time.time() + 120
        self.uri = None
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("server exited:\n" + self.log.read_text())
            m = re.search(r"(grpc(?:\+tls)?)://(\S+)", line)
            if m:
                self.uri = f"{m.group(1)}://{m.group(2)}"
                self.banner = line
                break
        if self.uri is None:
            raise RuntimeError("server did not start")

    def stop(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def server(demo, tmp_path):
    s = Server(demo, tmp_path / "state")
    yield s
    s.stop()
