"""What the browser tests share: Debian's Chromium, and ``edgelabel run`` as a real process with its log in a file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

requires_chromium = pytest.mark.skipif(not CHROMIUM.exists(),
                                       reason="/usr/bin/chromium is not installed (apt-get install -y chromium)")


class DaemonProcess:
    """``edgelabel run -c`` on ``cfg`` (whose web page listens on ``port``), stdout and stderr in ``log_path``."""

    def __init__(self, workdir: Path, log_path: Path, cfg: dict[str, Any], port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.state = Path(cfg["state_dir"])
        self.config = workdir / "edgelabel.yaml"
        self.config.write_text(json.dumps(cfg))  # JSON is YAML
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "edgelabel.edge.cli", "run", "-c", str(self.config)], cwd=ROOT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after 30 s; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
