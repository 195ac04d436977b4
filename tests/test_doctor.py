"""``edgelabel doctor`` on this machine (no GPU, no camera, no systemd) with real models and brokers.

The system paths the doctor reads (/etc/nv_tegra_release, /dev, /etc/edgelabel, ...) are pointed
at a temporary fake root so the results do not depend on the machine the suite runs on.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import edgelabel.edge.doctor as doctor
from edgelabel.edge.doctor import FAIL, INFO, OK, WARN, Doctor, parse_env_file, run_doctor
from tests.conftest import ROOT, free_port


@pytest.fixture
def sysroot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake system root: not a Jetson, no cameras, no GPU, no systemd, no installed service."""
    root = tmp_path / "sysroot"
    (root / "dev").mkdir(parents=True)
    for name, rel in {
        "INSTALLED_CONFIG": "etc/edgelabel/config.yaml",
        "ENV_FILE": "etc/edgelabel/edgelabel.env",
        "UNIT_FILE": "etc/systemd/system/edgelabel.service",
        "UNIT_DROPINS": "etc/systemd/system/edgelabel.service.d",
        "SYSTEMD_RUN": "run/systemd/system",
        "TEGRA_RELEASE": "etc/nv_tegra_release",
        "DEVICE_TREE_MODEL": "proc/device-tree/model",
        "NVIDIA_PROC": "proc/driver/nvidia/gpus",
        "DEV_DIR": "dev",
        "ARGUS_SOCKET": "tmp/argus_socket",
    }.items():
        monkeypatch.setattr(doctor, name, root / rel)
    monkeypatch.setattr(doctor, "SERVICE_USER", "edgelabel-test-no-such-user")
    monkeypatch.setattr(Doctor, "_cuda_from_pycuda", lambda self: None)
    monkeypatch.setattr(Doctor, "_cuda_from_nvidia_smi", lambda self: None)
    return root


def write_config(path: Path, assets: Path, port: int, **overrides: Any) -> Path:
    """A config that can run here: YOLOX-nano on the sample video, MQTT to ``port``."""
    data: dict[str, Any] = {
        "device_id": "doctor-test",
        "state_dir": str(path.parent / "state"),
        "model": {"path": str(assets / "models" / "yolox_nano.onnx"), "family": "yolox", "providers": ["cpu"]},
        "sources": {"clip": {"uri": str(assets / "videos" / "cars.mp4")}},
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": port},
        "dataset": {"enabled": True, "path": str(path.parent / "dataset")},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def diagnose(config: Path | None) -> tuple[int, dict[str, dict[str, Any]], str]:
    """Run the doctor: (exit code, checks by name, the text report)."""
    out = io.StringIO()
    code = run_doctor(str(config) if config else None, as_json=True, out=out)
    payload = json.loads(out.getvalue())
    assert payload["exit_code"] == code
    text = io.StringIO()
    assert run_doctor(str(config) if config else None, out=text) == code
    return code, {c["name"]: c for c in payload["checks"]}, text.getvalue()


def closed_port() -> int:
    port = free_port()
    with socket.socket() as s:  # nothing listens there
        s.bind(("127.0.0.1", port))
    return port


# ----------------------------------------------------------------------------- the two cases of the issue


def test_good_config_with_reachable_broker_is_ready(sysroot: Path, tmp_path: Path, assets: Path, broker) -> None:
    cfg = write_config(tmp_path / "job" / "config.yaml", assets, broker.port)
    code, checks, text = diagnose(cfg)
    assert code == 0, text
    assert checks["config"]["status"] == OK
    assert checks["model"]["status"] == OK and "yolox" in checks["model"]["detail"]
    assert checks["mqtt"]["status"] == OK and "CONNACK: Success" in checks["mqtt"]["detail"]
    assert checks["source clip"]["status"] == OK and "268 frames" in checks["source clip"]["detail"]
    assert checks["jetson"]["status"] == INFO
    assert checks["cuda"]["status"] == INFO  # no GPU is a fact here, not a failure
    assert checks["service"]["status"] == INFO and "not under systemd" in checks["service"]["detail"]
    assert checks["state dir"]["status"] == OK and checks["dataset"]["status"] == OK
    assert not any(c["status"] == FAIL for c in checks.values())
    assert text.rstrip().endswith("ready (exit 0)")
    for status in (OK, INFO):
        assert any(line.startswith(status) for line in text.splitlines())


def test_missing_model_fails_with_a_fix(sysroot: Path, tmp_path: Path, assets: Path, broker) -> None:
    missing = tmp_path / "models" / "nope.onnx"
    cfg = write_config(tmp_path / "job" / "config.yaml", assets, broker.port, model={"path": str(missing)})
    code, checks, text = diagnose(cfg)
    assert code == 1
    model = checks["model"]
    assert model["status"] == FAIL and str(missing) in model["detail"] and "not found" in model["detail"]
    assert model["fix"] and "model.path" in model["fix"]
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("FAIL") and "model" in line)
    assert "fix:" in lines[i + 1]
    assert "exit 1" in lines[-1]


# ----------------------------------------------------------------------------- broker


def test_unreachable_broker_is_only_a_warning(sysroot: Path, tmp_path: Path, assets: Path) -> None:
    port = closed_port()
    cfg = write_config(tmp_path / "job" / "config.yaml", assets, port)
    started = time.monotonic()
    code, checks, _ = diagnose(cfg)
    assert time.monotonic() - started < 30
    assert checks["mqtt"]["status"] == WARN
    assert f"127.0.0.1:{port}" in checks["mqtt"]["detail"] and "buffers" in checks["mqtt"]["fix"]
    assert code == 0


def test_mqtt_disabled_is_info(sysroot: Path, tmp_path: Path, assets: Path) -> None:
    cfg = write_config(tmp_path / "job" / "config.yaml", assets, 1, mqtt={"enabled": False})
    code, checks, _ = diagnose(cfg)
    assert checks["mqtt"]["status"] == INFO and code == 0


@pytest.fixture
def auth_broker(tmp_path: Path):
    """A Mosquitto that wants user 'labeler' with password 's3cret'."""
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    passwd_tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not (os.path.exists(exe) and os.path.exists(passwd_tool)):
        pytest.skip("mosquitto / mosquitto_passwd not installed (apt-get install mosquitto)")
    work = tmp_path / "auth-broker"
    work.mkdir()
    passwords = work / "passwords"
    subprocess.run([passwd_tool, "-b", "-c", str(passwords), "labeler", "s3cret"], check=True, capture_output=True)
    passwords.chmod(0o600)
    port = free_port()
    conf = work / "mosquitto.conf"
    # as root, mosquitto drops to user 'mosquitto', which cannot read pytest's private tmp folders
    run_as = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"{run_as}listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\npersistence false\n")
    with open(work / "mosquitto.log", "ab") as logf:
        proc = subprocess.Popen([exe, "-c", str(conf)], stdout=logf, stderr=logf)
    try:
        deadline = time.time() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"auth broker did not start: {(work / 'mosquitto.log').read_text()}")
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_wrong_password_is_a_failure(sysroot: Path, tmp_path: Path, assets: Path, auth_broker: int) -> None:
    cfg = write_config(tmp_path / "job" / "config.yaml", assets, auth_broker,
                       mqtt={"username": "labeler", "password": "wrong"})
    code, checks, _ = diagnose(cfg)
    mqtt = checks["mqtt"]
    assert mqtt["status"] == FAIL and "refused" in mqtt["detail"] and "CONNACK" in mqtt["detail"]
    assert "EDGELABEL_MQTT_PASSWORD" in mqtt["fix"]
    assert code == 1


def test_password_from_the_service_secrets_file(sysroot: Path, assets: Path, auth_broker: int,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The installed layout: /etc/edgelabel/config.yaml refers to ${VARS} of /etc/edgelabel/edgelabel.env."""
    monkeypatch.delenv("EDGELABEL_MQTT_PASSWORD", raising=False)
    cfg = write_config(doctor.INSTALLED_CONFIG, assets, auth_broker,
                       mqtt={"username": "labeler", "password": "${EDGELABEL_MQTT_PASSWORD}"})
    doctor.ENV_FILE.write_text("# secrets\nEDGELABEL_MQTT_PASSWORD='s3cret'\n")
    code, checks, text = diagnose(None)  # no -c: the installed config is picked
    assert checks["config"]["status"] == OK and str(cfg) in checks["config"]["detail"]
    assert checks["mqtt"]["status"] == OK and "as labeler" in checks["mqtt"]["detail"], text
    assert "EDGELABEL_MQTT_PASSWORD" not in os.environ  # the secrets did not leak into the process
    assert code == 0


def test_parse_env_file() -> None:
    text = "# c\n; c\nA=1\nexport B = two \nC=\"quoted value\"\nbad line\n1X=no\nD='x'\n"
    assert parse_env_file(text) == {"A": "1", "B": "two", "C": "quoted value", "D": "x"}


# ----------------------------------------------------------------------------- config-dependent verdicts


def test_gpu_only_config_fails_without_a_gpu(sysroot: Path, tmp_path: Path, assets: Path) -> None:
    cfg = write_config(tmp_path / "job" / "config.yaml", assets, 1,
                       model={"providers": ["tensorrt", "cuda"]}, mqtt={"enabled": False})
    code, checks, _ = diagnose(cfg)
    assert checks["cuda"]["status"] == FAIL and "cpu" in checks["cuda"]["fix"]
    assert code == 1


def test_cpu_fallback_config_only_informs(sysroot: Path, tmp_path: Path, assets: Path) -> None:
    cfg = write_config(tmp_path / "job" / "config.yaml", assets, 1,
                       model={"providers": ["tensorrt", "cuda", "cpu"]}, mqtt={"enabled": False})
    code, checks, _ = diagnose(cfg)
    assert checks["cuda"]["status"] == INFO
    assert checks["model"]["status"] == OK and "TensorRT not tried" in checks["model"]["detail"]
    assert code == 0


def test_camera_sources_without_gstreamer(sysroot: Path, tmp_path: Path, assets: Path) -> None:
    from edgelabel.edge.sources.gstreamer import gstreamer_available

    if gstreamer_available():
        pytest.skip("this OpenCV has GStreamer")
    cfg = write_config(tmp_path / "job" / "config.yaml", assets, 1, mqtt={"enabled": False}, sources={
        "cam": {"uri": "csi://0"},
        "pipe": {"uri": "gst://videotestsrc ! videoconvert ! video/x-raw,format=BGR ! appsink"},
        "off": {"uri": "csi://1", "enabled": False},
    })
    code, checks, _ = diagnose(cfg)
    assert checks["opencv"]["status"] == FAIL and "cam, pipe" in checks["opencv"]["detail"]
    assert checks["source cam"]["status"] == FAIL and "Jetson" in checks["source cam"]["detail"]
    assert checks["source pipe"]["status"] == FAIL
    assert checks["source off"]["status"] == INFO
    assert code == 1


def test_file_sources(sysroot: Path, tmp_path: Path, assets: Path) -> None:
    cfg = write_config(tmp_path / "job" / "config.yaml", assets, 1, mqtt={"enabled": False}, sources={
        "gone": {"uri": str(tmp_path / "no-such.mp4")},
        "later": {"uri": str(tmp_path / "inbox") + "/", "watch": True},
        "bus": {"uri": str(assets / "images" / "bus.jpg")},
        "garbage": {"uri": str(tmp_path / "junk.mp4")},
    })
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 10)
    code, checks, _ = diagnose(cfg)
    assert checks["source gone"]["status"] == FAIL and checks["source gone"]["fix"]
    assert checks["source later"]["status"] == WARN
    assert checks["source bus"]["status"] == OK
    assert checks["source garbage"]["status"] == FAIL
    assert code == 1


def test_rtsp_unreachable_is_a_warning_and_password_is_masked(sysroot: Path, tmp_path: Path, assets: Path) -> None:
    port = closed_port()
    cfg = write_config(tmp_path / "job" / "config.yaml", assets, 1, mqtt={"enabled": False}, sources={
        "line1": {"uri": f"rtsp://viewer:hunter2@127.0.0.1:{port}/stream1"}})
    code, checks, text = diagnose(cfg)
    assert checks["source line1"]["status"] == WARN
    assert "hunter2" not in text and "viewer:***@" in text
    assert code == 0


def test_invalid_config_still_reports_the_machine(sysroot: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("device_id: 'no spaces allowed'\nmodel: {path: x.onnx}\nsources: {a: {uri: 'rtps://cam'}}\n")
    code, checks, _ = diagnose(bad)
    assert checks["config"]["status"] == FAIL and "rtps" in checks["config"]["detail"]
    assert "check-config" in checks["config"]["fix"]
    assert {"python", "opencv", "onnxruntime", "service"} <= set(checks)
    assert code == 1


def test_without_config_uses_the_bundled_demo(sysroot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    code, checks, _ = diagnose(None)
    assert "bundled demo config" in checks["config"]["detail"]
    assert code in (0, 1)


# ----------------------------------------------------------------------------- disk, cache, permissions


def test_disk_thresholds(sysroot: Path, tmp_path: Path, assets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_config(tmp_path / "job" / "config.yaml", assets, 1, mqtt={"enabled": False})
    monkeypatch.setattr(doctor, "DISK_WARN", 1 << 62)
    code, checks, _ = diagnose(cfg)
    assert checks["state dir"]["status"] == WARN and code == 0
    monkeypatch.setattr(doctor, "DISK_FAIL", 1 << 61)
    code, checks, _ = diagnose(cfg)
    assert checks["dataset"]["status"] == FAIL and "free" in checks["dataset"]["fix"] and code == 1


def test_engine_cache_is_counted(sysroot: Path, tmp_path: Path, assets: Path) -> None:
    cfg = write_config(tmp_path / "job" / "config.yaml", assets, 1, mqtt={"enabled": False})
    code, checks, _ = diagnose(cfg)
    assert checks["engine cache"]["status"] == INFO and "not created yet" in checks["engine cache"]["detail"]
    engines = tmp_path / "job" / "state" / "engines"
    engines.mkdir(parents=True)
    (engines / "TensorrtExecutionProvider_TRTKernel_graph_x_0_0_fp16_sm87.engine").write_bytes(b"\0" * 2048)
    (engines / "TensorrtExecutionProvider_TRTKernel_graph_x_0_0_fp16_sm87.profile").write_bytes(b"\0")
    code, checks, _ = diagnose(cfg)
    assert checks["engine cache"]["status"] == OK and "1 cached engine(s)" in checks["engine cache"]["detail"]


def test_service_user_permissions(sysroot: Path, tmp_path: Path, assets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Judged for the service user: here 'nobody' stands in for 'edgelabel'."""
    try:
        import pwd

        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    if os.geteuid() != 0:
        pytest.skip("needs root to create a root-only device node stand-in")
    monkeypatch.setattr(doctor, "SERVICE_USER", "nobody")
    camera = doctor.DEV_DIR / "video0"
    camera.write_bytes(b"")
    os.chown(camera, 0, 0)
    camera.chmod(0o660)  # root:root rw-rw----: 'nobody' is not in its group
    state = tmp_path / "job" / "state"
    state.mkdir(parents=True)
    state.chmod(0o755)
    cfg = write_config(tmp_path / "job" / "config.yaml", assets, 1, mqtt={"enabled": False},
                       sources={"usb": {"uri": "v4l2:///dev/video0"}})
    # the config names /dev/video0, the fake root has it under DEV_DIR: point the source there
    cfg.write_text(cfg.read_text().replace("/dev/video0", str(camera)))
    code, checks, _ = diagnose(cfg)
    assert checks["cameras"]["status"] == FAIL and "usermod -a -G video nobody" in checks["cameras"]["fix"]
    assert "nobody: --" in checks["cameras"]["detail"]
    assert checks["source usb"]["status"] == FAIL
    assert checks["state dir"]["status"] == FAIL and "not writable by nobody" in checks["state dir"]["detail"]
    assert code == 1


def test_installed_unit_makes_outside_folders_read_only(sysroot: Path, tmp_path: Path, assets: Path) -> None:
    doctor.UNIT_FILE.parent.mkdir(parents=True)
    doctor.UNIT_FILE.write_text((ROOT / "systemd" / "edgelabel.service").read_text())
    cfg = write_config(tmp_path / "job" / "config.yaml", assets, 1, mqtt={"enabled": False})
    code, checks, _ = diagnose(cfg)
    assert checks["dataset"]["status"] == WARN and "ReadWritePaths=" in checks["dataset"]["fix"]
    assert "unit installed" in checks["service"]["detail"]
    dropins = doctor.UNIT_DROPINS
    dropins.mkdir(parents=True)
    (dropins / "paths.conf").write_text(f"[Service]\nReadWritePaths={tmp_path / 'job'}\n")
    code, checks, _ = diagnose(cfg)
    assert checks["dataset"]["status"] == OK and code == 0


# ----------------------------------------------------------------------------- a fake Jetson


def test_jetson_orin_jetpack6(sysroot: Path, tmp_path: Path, assets: Path) -> None:
    doctor.TEGRA_RELEASE.parent.mkdir(parents=True, exist_ok=True)
    doctor.TEGRA_RELEASE.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
                                    "DATE: Wed Jan  8 01:49:37 UTC 2025\n")
    doctor.DEVICE_TREE_MODEL.parent.mkdir(parents=True)
    doctor.DEVICE_TREE_MODEL.write_bytes(b"NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super\0")
    (doctor.DEV_DIR / "nvhost-gpu").write_bytes(b"")
    cfg = write_config(tmp_path / "job" / "config.yaml", assets, 1, mqtt={"enabled": False})
    _, checks, _ = diagnose(cfg)
    assert checks["jetson"]["status"] == OK
    assert "L4T R36.4.3 (JetPack 6.1/6.2)" in checks["jetson"]["detail"] and "Orin" in checks["jetson"]["detail"]
    assert checks["cuda"]["status"] == OK and "compute capability 8.7" in checks["cuda"]["detail"]
    # pip's OpenCV and no TensorRT on a Jetson: warned, with the fix
    from edgelabel.edge.sources.gstreamer import gstreamer_available

    if not gstreamer_available():
        assert checks["opencv"]["status"] == WARN and "EDGELABEL_SYSTEM_OPENCV=1" in checks["opencv"]["fix"]
    assert checks["tensorrt"]["status"] in (OK, WARN)


def test_jetpack5_is_flagged(sysroot: Path, tmp_path: Path, assets: Path) -> None:
    doctor.TEGRA_RELEASE.parent.mkdir(parents=True, exist_ok=True)
    doctor.TEGRA_RELEASE.write_text("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64\n")
    cfg = write_config(tmp_path / "job" / "config.yaml", assets, 1, mqtt={"enabled": False})
    _, checks, _ = diagnose(cfg)
    assert checks["jetson"]["status"] == WARN and "JetPack 5.x" in checks["jetson"]["detail"]


# ----------------------------------------------------------------------------- as a program


def test_module_entry_point_json(tmp_path: Path, assets: Path) -> None:
    cfg = write_config(tmp_path / "job" / "config.yaml", assets, 1,
                       mqtt={"enabled": False}, model={"path": str(tmp_path / "missing.onnx")})
    proc = subprocess.run([sys.executable, "-m", "edgelabel.edge.doctor", "-c", str(cfg), "--json"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["exit_code"] == 1 and payload["config"] == str(cfg)
    assert {"name", "status", "detail", "fix"} <= set(payload["checks"][0])
    assert any(c["name"] == "model" and c["status"] == FAIL for c in payload["checks"])


def test_the_demo_config_without_the_mirror_names_the_folder_and_the_variable(
        sysroot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No -c and no installed config: the bundled demo config, whose model and video live in the asset mirror."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("EDGELABEL_MIRROR", str(tmp_path / "no-mirror"))
    code, checks, _ = diagnose(None)
    assert code == 1
    for name in ("model", "source demo"):
        assert checks[name]["status"] == FAIL, checks[name]
        assert f"in {tmp_path / 'no-mirror'} (EDGELABEL_MIRROR=" in checks[name]["fix"], checks[name]
