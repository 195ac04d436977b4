"""The systemd unit (systemd-analyze verify + the directives the issue asks for), its example
config and secrets files, and the journald-friendly logging set-up."""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgelabel.edge.config import load_config
from edgelabel.edge.logsetup import JournalFormatter, journal_mode, setup_logging, syslog_priority

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "edgelabel.service"
CONFIG_EXAMPLE = ROOT / "systemd" / "config.example.yaml"
ENV_EXAMPLE = ROOT / "systemd" / "edgelabel.env.example"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value (unit files may repeat keys)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section].get(key)
    assert values, f"[{section}] {key}= missing"
    return values[-1]


# ----------------------------------------------------------------------------- systemd-analyze verify


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify wants ExecStart's binary to exist: point it at this interpreter, keep the rest of the unit as is
    text = UNIT.read_text()
    text, n = re.subn(r"^ExecStart=\S+", f"ExecStart={sys.executable}", text, flags=re.M)
    assert n == 1
    copy = tmp_path / "edgelabel.service"
    copy.write_text(text)
    proc = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60)
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, output
    # warnings (unknown keys, unparsable values) do not change the exit code: they must not be there either
    ours = [line for line in output.splitlines() if "edgelabel.service" in line]
    assert not ours, "\n".join(ours)


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above is meaningful: a typo in a key is reported."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    copy = tmp_path / "edgelabel.service"
    copy.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable}", UNIT.read_text(), flags=re.M)
                    .replace("WatchdogSec=", "WatchdogSecs="))
    proc = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60)
    assert "WatchdogSecs" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- what the unit must say


def test_notify_watchdog_and_restart(unit) -> None:
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert int(one(unit, "Service", "WatchdogSec")) > 0
    assert one(unit, "Service", "Restart") == "on-failure"
    assert "StartLimitIntervalSec" in unit["Unit"] and "StartLimitBurst" in unit["Unit"]
    assert one(unit, "Service", "ExecReload") in ("/bin/kill -HUP $MAINPID", "/usr/bin/kill -HUP $MAINPID")
    assert one(unit, "Service", "ExecStart").endswith("edgelabel run -c /etc/edgelabel/config.yaml")
    assert int(one(unit, "Service", "TimeoutStartSec")) >= 60
    assert "2" in one(unit, "Service", "RestartPreventExitStatus").split()  # bad config: no restart loop


def test_user_directories_and_secrets(unit) -> None:
    assert one(unit, "Service", "User") == "edgelabel"
    assert "video" in one(unit, "Service", "SupplementaryGroups").split()
    assert one(unit, "Service", "StateDirectory") == "edgelabel"
    assert one(unit, "Service", "LogsDirectory") == "edgelabel"
    assert one(unit, "Service", "ConfigurationDirectory") == "edgelabel"
    assert one(unit, "Service", "EnvironmentFile").lstrip("-") == "/etc/edgelabel/edgelabel.env"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_hardening_keeps_cameras_and_gpu(unit) -> None:
    svc = unit["Service"]
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert one(unit, "Service", "NoNewPrivileges") == "yes"
    # /tmp/argus_socket (CSI) must stay visible; device nodes must stay reachable
    assert svc.get("PrivateTmp", ["no"])[-1] == "no"
    for key in ("DynamicUser", "PrivateDevices", "ProtectClock", "MemoryDenyWriteExecute"):
        assert svc.get(key, ["no"])[-1] in ("no", "false"), f"{key} breaks CSI cameras, V4L2 or CUDA"
    assert "DeviceAllow" not in svc and svc.get("DevicePolicy", ["auto"])[-1] == "auto"
    families = one(unit, "Service", "RestrictAddressFamilies").split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)


# ----------------------------------------------------------------------------- example files


def test_config_example_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("EDGELABEL_DEVICE", "EDGELABEL_MQTT_USER", "EDGELABEL_MQTT_PASSWORD", "CAM_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(CONFIG_EXAMPLE)
    assert cfg.state_dir == "/var/lib/edgelabel"
    assert cfg.dataset.path.startswith("/var/lib/edgelabel/")  # writable under ProtectSystem=strict
    assert cfg.model.path.startswith("/opt/edgelabel/")  # rewritten by install.sh --prefix
    assert any(s.enabled for s in cfg.sources.values())


def test_env_example_only_assigns_variables_the_config_uses() -> None:
    config_text = CONFIG_EXAMPLE.read_text()
    names = [line.split("=", 1)[0].lstrip("#").strip() for line in ENV_EXAMPLE.read_text().splitlines()
             if re.match(r"#?[A-Z_][A-Z0-9_]*=", line.strip())]
    assert "EDGELABEL_MQTT_PASSWORD" in names
    # variables the daemon reads itself (limits such as the decode budget), found in its own source
    read_by_daemon = set()
    for py in (ROOT / "edge").rglob("*.py"):
        read_by_daemon |= set(re.findall(r'environ(?:\.get\(|\[)\s*"([A-Z_][A-Z0-9_]*)"', py.read_text()))
    for name in names:
        assert f"${{{name}" in config_text or name.startswith("EDGELABEL_LOG") or name in read_by_daemon, \
            f"{name} is not used by the config nor read by the daemon"


# ----------------------------------------------------------------------------- logging


@pytest.fixture
def clean_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


def _stream_id(f) -> str:
    st = os.fstat(f.fileno())
    return f"{st.st_dev}:{st.st_ino}"


def test_journal_format_when_stderr_is_the_journal(tmp_path: Path, clean_root_logger: None) -> None:
    with open(tmp_path / "journal", "w+", encoding="utf-8") as stream:
        setup_logging("info", stream=stream, env={"JOURNAL_STREAM": _stream_id(stream)})
        logger = logging.getLogger("edgelabel.test")
        logger.debug("hidden at info")
        logger.info("model loaded")
        logger.warning("broker away")
        try:
            raise ValueError("bad frame")
        except ValueError:
            logger.exception("inference failed")
        stream.flush()
        stream.seek(0)
        lines = stream.read().splitlines()
    assert lines[0] == "<6>edgelabel.test: model loaded"  # no timestamp: journald adds its own
    assert lines[1] == "<4>edgelabel.test: broker away"
    assert lines[2] == "<3>edgelabel.test: inference failed"
    assert all(line.startswith("<3>") for line in lines[2:]), "every traceback line keeps the priority"
    assert any("ValueError: bad frame" in line for line in lines)
    assert not any("hidden" in line for line in lines)


def test_human_format_in_a_terminal(clean_root_logger: None) -> None:
    stream = io.StringIO()
    setup_logging("debug", stream=stream, env={})
    logging.getLogger("edgelabel.test").debug("details")
    line = stream.getvalue().splitlines()[-1]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} DEBUG   edgelabel.test: details$", line), line


def test_journal_stream_of_another_file_is_not_the_journal(tmp_path: Path) -> None:
    """A shell redirect under systemd: JOURNAL_STREAM is inherited but stderr is a file now."""
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        assert journal_mode(a, {"JOURNAL_STREAM": _stream_id(a)})
        assert not journal_mode(b, {"JOURNAL_STREAM": _stream_id(a)})


def test_invocation_id_fallback(tmp_path: Path) -> None:
    with open(tmp_path / "pipe-like", "w") as f:
        assert journal_mode(f, {"INVOCATION_ID": "0123abcd"})
        assert not journal_mode(f, {})


def test_reconfigure_replaces_only_our_handlers(clean_root_logger: None) -> None:
    root = logging.getLogger()
    foreign = logging.NullHandler()
    root.addHandler(foreign)
    first, second = io.StringIO(), io.StringIO()
    setup_logging("info", stream=first, env={})
    setup_logging("warning", stream=second, env={})  # a reload with a new level
    logging.getLogger("edgelabel.test").info("quiet now")
    logging.getLogger("edgelabel.test").warning("loud")
    assert foreign in root.handlers
    assert "loud" in second.getvalue() and "quiet now" not in second.getvalue()
    assert "loud" not in first.getvalue()
    assert root.level == logging.WARNING


def test_optional_log_file(tmp_path: Path, clean_root_logger: None) -> None:
    setup_logging("info", stream=io.StringIO(), env={"EDGELABEL_LOG_DIR": str(tmp_path / "logs")})
    logging.getLogger("edgelabel.test").info("to the file too")
    for h in logging.getLogger().handlers:
        h.flush()
    assert "to the file too" in (tmp_path / "logs" / "edgelabel.log").read_text()


def test_priorities() -> None:
    assert [syslog_priority(lv) for lv in (10, 20, 30, 40, 50)] == [7, 6, 4, 3, 2]
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "a\nb", None, None)
    assert JournalFormatter().format(record) == "<3>x: a\n<3>b"
