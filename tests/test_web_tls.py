"""HTTPS extras through the real server: HSTS when asked for, the certificate's fingerprint and expiry in the
start log and in ``edgelabel doctor`` (text and JSON), and the warning for plain HTTP beyond loopback.

(The HTTPS transport itself, ``auto`` with both generators and given files, is in tests/test_web_auth.py.)
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import ssl
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgelabel.edge.certs import certificate_info
from edgelabel.edge.config import Config, ConfigError, config_from_dict
from edgelabel.edge.doctor import FAIL, OK, WARN, Doctor, run_doctor
from edgelabel.web.app import create_app
from edgelabel.web.server import start_web
from edgelabel.web.sink import WebSink
from edgelabel.web.tls import ensure_self_signed
from tests.test_doctor import sysroot  # noqa: F401  # the doctor's fake system root (a fixture)
from tests.test_review import FakePipeline

TOKEN = "tls-test-operator-token-8d1e4b7a"
KEY = "tls-test-secret-key-" + "k" * 32
YEAR = 31536000


def cfg_dict(tmp: Path, **web: Any) -> dict[str, Any]:
    return {
        "device_id": "tls-dev", "state_dir": str(tmp / "state"),
        "model": {"path": "m.onnx"}, "sources": {"cam": {"uri": "v4l2:///dev/video9"}},
        "mqtt": {"enabled": False}, "dataset": {"path": str(tmp / "ds")},
        "web": {"enabled": True, "token": TOKEN, **web},
    }


def cfg_for(tmp: Path, **web: Any) -> Config:
    return config_from_dict(cfg_dict(tmp, **web), base_dir=tmp)


def https_get(url: str, cafile: Path) -> tuple[int, dict[str, str]]:
    ctx = ssl.create_default_context(cafile=str(cafile))
    with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}


def test_hsts_is_sent_over_https_only_when_asked_for(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = cfg_for(tmp_path, tls={"auto": True, "hsts": YEAR})
    with caplog.at_level(logging.INFO, logger="edgelabel.web"):
        server = start_web(FakePipeline(cfg), WebSink(cfg), cfg, host="127.0.0.1", port=0)
    cert = tmp_path / "state" / "web-tls-cert.pem"
    try:
        code, headers = https_get(server.url + "/login", cert)
        assert code == 200 and headers["strict-transport-security"] == f"max-age={YEAR}"
        info = certificate_info(cert)
        start = next(r.getMessage() for r in caplog.records if "HTTPS with" in r.getMessage())
        assert info.fingerprint in start and f"valid until {info.not_after:%Y-%m-%d}" in start
        assert f"HSTS max-age={YEAR}" in start
    finally:
        server.stop()
    # the same certificate without hsts: no header (HSTS is opt-in: it binds browsers to HTTPS for its max-age)
    plain = cfg_for(tmp_path, tls="auto")
    server = start_web(FakePipeline(plain), WebSink(plain), plain, host="127.0.0.1", port=0)
    try:
        code, headers = https_get(server.url + "/login", cert)
        assert code == 200 and "strict-transport-security" not in headers
    finally:
        server.stop()
    # never on an answer that did not go over HTTPS (here: the app reached over plain HTTP)
    app = create_app(cfg, FakePipeline(cfg), WebSink(cfg), test_config={"TESTING": True, "EDGELABEL_TOKEN": TOKEN,
                                                                        "SECRET_KEY": KEY})
    assert "Strict-Transport-Security" not in app.test_client().get("/login").headers
    assert app.test_client().get("/login", base_url="https://localhost").headers[
        "Strict-Transport-Security"] == f"max-age={YEAR}"


@pytest.mark.parametrize("tls, problem", [
    ({"cert": "c.pem", "key": "k.pem", "hsts": "1y"}, "web.tls.hsts: expected seconds"),
    ({"auto": True, "hsts": -1}, "web.tls.hsts: expected seconds"),
    ({"auto": True, "hsts": True}, "web.tls.hsts: expected seconds"),
    ({"auto": True, "cert": "c.pem"}, "web.tls: expected"),
    ({"hsts": YEAR}, "web.tls: expected"),
])
def test_bad_tls_settings_are_refused_naming_the_field(tmp_path: Path, tls: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfg_for(tmp_path, tls=tls)
    assert problem in "\n".join(err.value.problems)


@pytest.mark.parametrize("host, warned", [("0.0.0.0", True), ("127.0.0.1", False)])
def test_plain_http_beyond_loopback_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture, host: str,
                                                    warned: bool) -> None:
    cfg = cfg_for(tmp_path)
    with caplog.at_level(logging.INFO, logger="edgelabel.web"):
        server = start_web(FakePipeline(cfg), WebSink(cfg), cfg, host=host, port=0)
    server.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "plain HTTP" in r.getMessage()]
    assert bool(warnings) is warned, warnings
    if warned:
        assert "web.tls: auto" in warnings[0]


def doctor_web(tmp_path: Path, **web: Any) -> Any:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg_dict(tmp_path, **web)))
    doc = Doctor(str(path))
    doc.check_config()
    assert doc.cfg is not None, doc.checks
    doc.check_web()
    return next(c for c in doc.checks if c.name == "web")


def test_doctor_shows_the_certificate_fingerprint_and_expiry(tmp_path: Path, sysroot: Path) -> None:  # noqa: F811
    cfg = cfg_for(tmp_path, tls={"auto": True, "hsts": YEAR}, host="0.0.0.0")
    assert doctor_web(tmp_path, tls={"auto": True}, host="0.0.0.0").status == "INFO"  # not made yet: first start
    cert, _ = ensure_self_signed(cfg)
    info = certificate_info(cert)
    check = doctor_web(tmp_path, tls={"auto": True, "hsts": YEAR}, host="0.0.0.0")
    assert check.status == OK and info.fingerprint in check.detail and f"{info.not_after:%Y-%m-%d}" in check.detail
    assert check.data["fingerprint_sha256"] == info.fingerprint and check.data["hsts"] == YEAR
    assert check.data["not_after"] == info.not_after.isoformat() and check.data["days_left"] > 365

    # the whole report, text and --json
    path = tmp_path / "config.yaml"
    out = io.StringIO()
    run_doctor(str(path), as_json=True, out=out)
    web = next(c for c in json.loads(out.getvalue())["checks"] if c["name"] == "web")
    assert web["status"] == OK and web["data"]["fingerprint_sha256"] == info.fingerprint
    text = io.StringIO()
    run_doctor(str(path), out=text)
    assert info.fingerprint in text.getvalue()


def test_doctor_warns_of_plain_http_and_of_a_given_certificate_near_or_past_expiry(
        tmp_path: Path, sysroot: Path) -> None:  # noqa: F811
    check = doctor_web(tmp_path, host="0.0.0.0")
    assert check.status == WARN and "plain HTTP" in check.detail and "web.tls" in (check.fix or "")
    assert doctor_web(tmp_path, host="127.0.0.1").status == OK
    assert doctor_web(tmp_path, host="0.0.0.0", trusted_proxy="10.0.0.2").status == "INFO"

    for days, status in ((-1, FAIL), (10, WARN), (400, OK)):
        cert, key = make_cert(tmp_path, days)
        check = doctor_web(tmp_path, tls={"cert": str(cert), "key": str(key)})
        assert check.status == status, (days, check)
        assert check.data["fingerprint_sha256"] == certificate_info(cert).fingerprint
    check = doctor_web(tmp_path, tls={"cert": str(tmp_path / "nope.pem"), "key": str(key)})
    assert check.status == FAIL and "nope.pem" in check.detail


def make_cert(tmp: Path, days: int) -> tuple[Path, Path]:
    """A self-signed certificate that expires ``days`` from now (negative: expired)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "doctor-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=400))
            .not_valid_after(now + datetime.timedelta(days=days)).sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / f"cert-{days}.pem", tmp / f"key-{days}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
