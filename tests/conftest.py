"""Shared fixtures: the asset mirror (../shared) and a private Mosquitto broker."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests import fuzzing

FUZZ_PROFILE = fuzzing.load()
ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("EDGELABEL_MIRROR", ROOT.parent / "shared")).resolve()
MODELS = ASSETS / "models"
IMAGES = ASSETS / "images"
VIDEOS = ASSETS / "videos"


def pytest_report_header(config: pytest.Config) -> str:
    return f"hypothesis profile: {FUZZ_PROFILE} (tests/fuzzing.py)"


@pytest.fixture(scope="session")
def assets() -> Path:
    if not (MODELS / "yolox_nano.onnx").is_file():
        pytest.fail(f"asset mirror not found at {ASSETS} (set EDGELABEL_MIRROR to the shared folder)")
    return ASSETS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """A Mosquitto process of our own on a free loopback port."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        conf = self.workdir / f"mosquitto-{self.port}.conf"
        # max_queued_messages 0: mosquitto's default (1000) drops messages to a subscriber that falls behind
        # ("Outgoing messages are being dropped"), and the tests' subscribers must see everything the daemon sent
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        "max_queued_messages 0\n")
        log = open(self.workdir / f"mosquitto-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=log, stderr=log)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mosquitto exited with {self.proc.returncode}; see {log.name}") from None
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening within 10 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def broker(tmp_path: Path):
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.skip("mosquitto binary not installed (apt-get install mosquitto)")
    b = Broker(tmp_path).start()
    yield b
    b.stop()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """Where screenshots and daemon logs of a test go: $EDGELABEL_ARTIFACTS, else the test's tmp folder."""
    path = Path(os.environ.get("EDGELABEL_ARTIFACTS") or tmp_path / "artifacts").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
