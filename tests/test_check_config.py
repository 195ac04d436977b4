"""``check-config`` reports everything in one pass, and refuses a model ``run`` would refuse, in run's words.

The model that is not a detector is a real ONNX file built here with the ``onnx`` package (an Identity
graph): it loads in ONNX Runtime, so only the detector checks can refuse it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from edgelabel.edge.cli import main
from edgelabel.edge.doctor import FAIL, run_doctor
from tests.helpers import run_edgelabel


def identity_model(path: Path) -> Path:
    """A valid ONNX model whose output is its input image: loads everywhere, detects nothing."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 64, 64])
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["output"])], "identity", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by every ONNX Runtime the project supports
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_schema_and_path_problems_are_reported_in_one_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    cfg = write(tmp_path / "c.yaml", {
        "model": {"path": str(tmp_path / "missing.onnx"), "conf": 5},
        "sources": {"a": {"uri": str(tmp_path / "no-such-folder") + "/"}},
        "mqtt": {"qos": 7},
    })
    assert main(["check-config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "model.conf: 5 is above the maximum 1.0" in err
    assert "mqtt.qos: 7 is above the maximum 2" in err
    assert f"model.path: {tmp_path / 'missing.onnx'}: file not found" in err
    assert f"sources.a.uri: {tmp_path / 'no-such-folder'}: no such file or folder" in err
    assert err.strip().splitlines()[-1] == f"{cfg}: 4 problem(s)"
    # run refuses the same file with the same four lines, before anything starts
    assert main(["run", "-c", str(cfg)]) == 2
    run_err = capsys.readouterr().err
    assert run_err.count("edgelabel: config error: ") == 4, run_err
    assert not (tmp_path / "state").exists()


def test_a_field_with_a_schema_problem_is_not_checked_on_disk_too(tmp_path: Path, capsys):
    cfg = write(tmp_path / "c.yaml", {"model": {"path": "m.onnx"}, "sources": {"a": {"uri": "rtps://cam"}}})
    assert main(["check-config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if "sources.a.uri" in ln] == [
        f"{cfg}: sources.a.uri: unsupported scheme 'rtps' (use file, v4l2, rtsp, csi, gst)"]
    assert "model.path: " in err and "file not found" in err


@pytest.fixture
def not_a_detector(tmp_path: Path, assets: Path) -> Path:
    """A config valid by schema and on disk whose model is not a detector."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "bus.jpg").write_bytes((assets / "images" / "bus.jpg").read_bytes())
    model = identity_model(tmp_path / "identity.onnx")
    return write(tmp_path / "c.yaml", {"state_dir": str(tmp_path / "state"), "model": {"path": str(model)},
                                       "sources": {"a": {"uri": str(images) + "/"}}, "mqtt": {"enabled": False},
                                       "dataset": {"path": str(tmp_path / "dataset")}})


def test_check_config_and_doctor_refuse_a_non_detector_with_runs_message(not_a_detector: Path, capsys):
    res = run_edgelabel("run", "-c", str(not_a_detector), timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    run_lines = [ln for ln in res.stderr.splitlines() if ln.startswith("edgelabel: ")]
    assert len(run_lines) == 1, res.stderr[-3000:]
    message = run_lines[0].removeprefix("edgelabel: ")
    assert "identity.onnx" in message and "not a detector layout" in message

    assert main(["check-config", str(not_a_detector)]) == 2
    err = capsys.readouterr().err
    assert f"{not_a_detector}: model.path: {message}" in err.splitlines(), err

    out = io.StringIO()
    assert run_doctor(str(not_a_detector), as_json=True, out=out) == 1
    checks = {c["name"]: c for c in json.loads(out.getvalue())["checks"]}
    assert checks["model"]["status"] == FAIL and checks["model"]["detail"] == message


def test_check_config_accepts_a_real_detector(tmp_path: Path, assets: Path, capsys):
    cfg = write(tmp_path / "c.yaml", {"model": {"path": str(assets / "models" / "yolox_nano.onnx")},
                                      "sources": {"a": {"uri": str(assets / "images") + "/"}}})
    assert main(["check-config", str(cfg)]) == 0, capsys.readouterr().err
    assert "OK" in capsys.readouterr().out


def test_a_yaml_syntax_error_names_the_file_once(tmp_path: Path, capsys):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("model:\n  path: m.onnx\nsources: [unclosed\n")
    assert main(["check-config", str(cfg)]) == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith(f"{cfg}: line ") and "invalid YAML" in first
    assert first.count(cfg.name) == 1, first
    assert main(["run", "-c", str(cfg)]) == 2
    assert capsys.readouterr().err.count(cfg.name) == 1

    out = io.StringIO()
    assert run_doctor(str(cfg), as_json=True, out=out) == 1
    config = {c["name"]: c for c in json.loads(out.getvalue())["checks"]}["config"]
    assert config["status"] == FAIL and config["detail"].count(cfg.name) == 1, config["detail"]
    assert config["detail"].startswith(f"{cfg}: line ")


def test_the_demo_config_outside_the_repository_says_where_it_looked_for_the_mirror(tmp_path: Path):
    """No -c, run from a folder without ../shared: the model and video are missing, and the reason is named."""
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "EDGELABEL_MIRROR"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for mirror in (None, str(tmp_path / "no-mirror")):
        run_env = env if mirror is None else {**env, "EDGELABEL_MIRROR": mirror}
        res = subprocess.run([sys.executable, "-m", "edgelabel.edge.cli", "run"], cwd=cwd, env=run_env, capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 2, res.stderr[-3000:]
        looked = tmp_path / "no-mirror" if mirror else tmp_path / "shared"  # ../shared from cwd
        assert f"model.path: {looked}/models/yolox_nano.onnx: file not found" in res.stderr, res.stderr
        hint = [ln for ln in res.stderr.splitlines() if "EDGELABEL_MIRROR: " in ln]
        assert len(hint) == 1 and f"looked for the asset mirror (models/, videos/) in {looked} " in hint[0], res.stderr
        assert ("EDGELABEL_MIRROR is not set" if mirror is None else f"EDGELABEL_MIRROR={mirror}") in hint[0]
        assert not (cwd / "state").exists()


def test_a_model_whose_input_is_not_an_image_is_refused_before_any_frame(tmp_path: Path, assets: Path) -> None:
    """Its output has a YOLOv8 layout, so every output check passed: run logged an inference error on every
    frame and exited 0 with nothing labeled."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 84, 8400])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 84, 8400])
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["output0"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "flat.onnx"))
    images = tmp_path / "images"
    images.mkdir()
    (images / "bus.jpg").write_bytes((assets / "images" / "bus.jpg").read_bytes())
    res = run_edgelabel("label", str(images), "--model", str(tmp_path / "flat.onnx"), "--out", str(tmp_path / "out"),
                        timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr[-2000:]
    assert "not an image [N, 3, H, W]" in res.stderr and "[1, 84, 8400]" in res.stderr, res.stderr[-2000:]


def test_a_job_where_every_frame_fails_in_the_engine_is_not_a_success(tmp_path: Path, assets: Path) -> None:
    """A model that loads but fails at run time (a Reshape that fits no real input) labeled nothing, logged a
    traceback per frame and exited 0: now exit 1 with a line saying that every frame failed."""
    from onnx import numpy_helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, "h", "w"])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 84, "n"])
    shape = numpy_helper.from_array(np.array([1, 84, -1], dtype=np.int64), "shape")
    graph = helper.make_graph([helper.make_node("Reshape", ["images", "shape"], ["output0"])], "g", [x], [y],
                              initializer=[shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "fails.onnx"))
    images = tmp_path / "images"
    images.mkdir()
    for name in ("bus.jpg", "dog.jpg"):
        (images / name).write_bytes((assets / "images" / name).read_bytes())
    for args in (["label", str(images), "--model", str(tmp_path / "fails.onnx"), "--out", str(tmp_path / "out")],
                 ["run", "--source", str(images), "--model", str(tmp_path / "fails.onnx"), "--mqtt", "off",
                  "--state-dir", str(tmp_path / "state")]):
        res = run_edgelabel(*args, timeout=120)
        assert res.returncode == 1, (args[0], res.returncode, res.stderr[-2000:])
        assert "every frame read (2) failed" in res.stderr, res.stderr[-2000:]
