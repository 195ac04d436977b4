"""Config validation: every error names the field path, the bad value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgelabel.edge.cli import main
from edgelabel.edge.config import ConfigError, config_from_dict, load_config


def _base(**over):
    data = {"model": {"path": "m.onnx"}, "sources": {"cam1": {"uri": "/data/in/"}}}
    data.update(over)
    return data


def _problems(data) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data)
    return exc.value.problems


def test_minimal_config_defaults():
    cfg = config_from_dict(_base())
    assert cfg.model.engine == "auto"
    assert (cfg.model.threads, cfg.model.workers, cfg.model.precision) == (0, 0, "fp16")
    assert cfg.mqtt.qos == 1 and cfg.mqtt.prefix == "edgelabel"
    assert cfg.sources["cam1"].name == "cam1"
    assert cfg.dataset.formats == ["yolo", "coco"]


def test_unsupported_scheme_names_field_value_and_choices():
    probs = _problems(_base(sources={"cam1": {"uri": "rtps://10.0.0.2/stream"}}))
    assert probs == ["sources.cam1.uri: unsupported scheme 'rtps' (use file, v4l2, rtsp, csi, gst)"]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"mqtt": {"qos": 3}}, "mqtt.qos: 3 is above the maximum 2"),
        ({"mqtt": {"port": "abc"}}, "mqtt.port: expected an integer, got 'abc'"),
        ({"model": {"path": "m.onnx", "family": "yolo99"}},
         "model.family: 'yolo99' is not allowed (use auto, yolov8, yolov5, yolox, end2end, efficientnms)"),
        ({"model": {"path": "m.onnx", "conf": 1.5}}, "model.conf: 1.5 is above the maximum 1.0"),
        ({"model": {"path": "m.onnx", "providers": ["tensorrt", "rocm"]}},
         "model.providers[1]: 'rocm' is not allowed (use tensorrt, cuda, cpu)"),
        ({"dataset": {"formats": ["yolo", "voc"]}}, "dataset.formats[1]: 'voc' is not allowed (use yolo, coco)"),
        ({"sources": {"cam1": {"uri": "x", "fps": -1}}}, "sources.cam1.fps: -1 is below the minimum 0.0"),
        ({"sources": {"cam1": {"uri": "x", "loop": "maybe"}}}, "sources.cam1.loop: expected true/false, got 'maybe'"),
        ({"sources": {}}, "sources: at least one source is required"),
        ({"mqtt": {"prefix": "a/#"}}, "mqtt.prefix: 'a/#' must not be empty"),
        ({"device_id": "has space"}, "device_id: 'has space' must be 1-64 characters"),
        ({"sources": {"c": {"uri": "gst://videotestsrc ! fakesink"}}},
         "sources.c.uri: 'gst://videotestsrc ! fakesink': a GStreamer pipeline must end in an appsink"),
        ({"sources": {"c": {"uri": "rtsp:///nohost"}}}, "sources.c.uri: 'rtsp:///nohost' has no host"),
    ],
)
def test_field_errors(data, expected):
    probs = _problems(_base(**data))
    assert any(p.startswith(expected) for p in probs), probs


def test_unknown_field_lists_allowed():
    probs = _problems(_base(mqtt={"hots": "x"}))
    assert len(probs) == 1 and probs[0].startswith("mqtt.hots: unknown field (allowed: enabled, host, port")


def test_several_problems_reported_together():
    probs = _problems(_base(mqtt={"qos": 5, "port": 0}))
    assert len(probs) == 2


def test_env_substitution(monkeypatch):
    monkeypatch.setenv("MQTT_PASS", "s3cret")
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    cfg = config_from_dict(_base(mqtt={"password": "${MQTT_PASS}", "username": "${NOT_SET_ANYWHERE:-}",
                                       "host": "${NOT_SET_ANYWHERE:-broker.local}"}))
    assert cfg.mqtt.password == "s3cret"
    assert cfg.mqtt.username is None  # empty default means "not set"
    assert cfg.mqtt.host == "broker.local"
    probs = _problems(_base(mqtt={"password": "${NOT_SET_ANYWHERE}"}))
    assert probs == ["mqtt.password: environment variable NOT_SET_ANYWHERE is not set (set it or write ${NOT_SET_ANYWHERE:-default})"]


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  path: m.onnx\nsources: [unclosed\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert str(p) in exc.value.problems[0] and "line" in exc.value.problems[0]


def test_relative_paths_resolve_against_config_folder(tmp_path: Path):
    p = tmp_path / "sub" / "edgelabel.yaml"
    p.parent.mkdir()
    p.write_text("model: {path: models/m.onnx}\nsources: {a: {uri: images/}}\n")
    cfg = load_config(p)
    assert cfg.resolve(cfg.model.path) == p.parent / "models" / "m.onnx"


def test_check_config_command(tmp_path: Path, assets: Path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(f"model: {{path: {assets}/models/yolox_nano.onnx, family: yolox}}\n"
                    f"sources: {{cars: {{uri: {assets}/videos/cars.mp4}}}}\n")
    assert main(["check-config", str(good)]) == 0
    assert "OK" in capsys.readouterr().out

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: /nowhere/model.onnx}\nsources: {cam1: {uri: 'rtps://cam'}}\nmqtt: {qos: 7}\n")
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "sources.cam1.uri: unsupported scheme 'rtps' (use file, v4l2, rtsp, csi, gst)" in err
    assert "mqtt.qos: 7 is above the maximum 2" in err

    missing = tmp_path / "ok-schema.yaml"
    missing.write_text("model: {path: /nowhere/model.onnx}\nsources: {a: {uri: /nowhere/in/}}\n")
    assert main(["check-config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "model.path: /nowhere/model.onnx: file not found" in err
    assert "sources.a.uri: /nowhere/in: no such file or folder" in err


def test_bundled_default_config_is_valid(assets: Path, monkeypatch):
    from edgelabel.edge.cli import DEFAULT_CONFIG

    monkeypatch.setenv("EDGELABEL_MIRROR", str(assets))
    assert main(["check-config", str(DEFAULT_CONFIG)]) == 0


def test_an_odd_source_name_is_quoted_in_every_problem_about_it():
    """A key with spaces or quotes is quoted as everywhere else, so the line still reads '<field>: <message>'."""
    probs = _problems(_base(sources={"a b": None, "'": {"uri": "x", "reconnect": {"initial": 5, "max": 1}}}))
    assert "sources.'a b': source names must be 1-64 characters of letters, digits, '_', '-', '.'" in probs
    assert "sources.'a b'.uri: required" in probs
    assert any(p.startswith("sources.\"'\".reconnect.max: 1.0 is below") for p in probs), probs


def test_a_key_ending_in_a_newline_is_quoted() -> None:
    """``$`` matches before a final newline: the key ``"0\\n"`` went out unquoted and split the problem line."""
    with pytest.raises(ConfigError) as info:
        config_from_dict({"0\n": None})
    assert "'0\\n': unknown field" in info.value.problems[0]
    assert all("\n" not in line for line in info.value.problems)


def test_names_with_a_trailing_newline_are_refused():
    """``$`` also matches before a final newline: a device id, a source name or an operator name ending in
    ``\\n`` passed and went into MQTT topics, record ids and review records."""
    assert any(p.startswith("device_id:") for p in _problems(_base(device_id="line3\n")))
    assert any(p.startswith("sources.") for p in _problems(_base(sources={"cam1\n": {"uri": "/data/in/"}})))
    ops = {"bob\n": {"role": "viewer", "token": "a-long-enough-token-0123456789"}}
    assert any("bob" in p for p in _problems(_base(web={"enabled": True, "operators": ops})))
