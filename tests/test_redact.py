"""edgelabel.edge.redact: every credential form a camera or broker URI can carry is masked, wherever it stands.

The property tests generate URIs with the secret in a random form and position (user info with raw
separators, query and path parameters under any credential name in any case and position, GStreamer
properties, quoted values, percent-encoded nesting) inside random surrounding text, and assert that the secret
does not survive.  They run derandomized (tests/fuzzing.py).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgelabel.edge.logsetup import setup_logging
from edgelabel.edge.redact import redact
from edgelabel.edge.sources import parse_uri
from edgelabel.edge.sources.rtsp import host_port, mask_credentials
from edgelabel.web.redact import Redactor
from tests.fuzzing import examples

PARAM_NAMES = ["user", "username", "password", "pass", "pwd", "passwd", "token", "key", "auth", "authorization",
               "api_key", "secret", "user-pw", "user-id", "proxy-pw", "access_token"]
#: characters a secret may hold raw in a parameter value (the separators & ; / , | ! and blanks end a value)
PARAM_SAFE = st.characters(codec="ascii", categories=("L", "N"), include_characters="-_.~+*$()#@:%^=")
#: raw characters a password can hold in URL user info (anything but blanks and quotes; '@', '#', '/', '?' too)
USERINFO_SAFE = st.characters(codec="ascii", categories=("L", "N", "P", "S"), exclude_characters=" \t\n\"'<>")


def secret_strategy(alphabet: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    # long enough to be recognisable in the output, with a unique core so it cannot be a substring by chance
    return st.text(alphabet, min_size=6, max_size=24).map(lambda s: "Zq9" + s)


def mixed_case(draw: st.DrawFn, name: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(c.upper() if f else c for c, f in zip(name, flips, strict=True))


@st.composite
def uri_with_secret(draw: st.DrawFn) -> tuple[str, str]:
    form = draw(st.sampled_from(["userinfo", "query", "path", "gst", "gst-quoted", "encoded", "colon"]))
    host = draw(st.sampled_from(["cam1", "10.0.0.7", "cam.plant.local:554", "[fe80::1]:8554"]))
    others = draw(st.lists(st.sampled_from(["channel=1", "subtype=0", "stream=main", "profile=2", "fps=15"]), max_size=3))
    if form == "userinfo":
        secret = draw(secret_strategy(USERINFO_SAFE))
        user = draw(st.sampled_from(["admin", "op", "root"]))
        text = f"rtsp://{user}:{secret}@{host}/live" + (f"?{'&'.join(others)}" if others else "")
    elif form in ("query", "path"):
        secret = draw(secret_strategy(PARAM_SAFE))
        name = mixed_case(draw, draw(st.sampled_from(PARAM_NAMES)))
        params = list(others)
        params.insert(draw(st.integers(0, len(params))), f"{name}={secret}")
        joined = "&".join(params)
        text = f"rtsp://{host}/cgi-bin/stream?{joined}" if form == "query" else f"rtsp://{host}/{joined}"
    elif form.startswith("gst"):
        secret = draw(secret_strategy(PARAM_SAFE))
        prop = draw(st.sampled_from(["user-pw", "proxy-pw", "user-id", "password"]))
        value = f'"{secret} x"' if form == "gst-quoted" else secret
        text = f"rtspsrc location=rtsp://{host}/s {prop}={value} latency=200 ! rtph264depay ! appsink"
    elif form == "encoded":
        secret = draw(secret_strategy(st.characters(codec="ascii", categories=("L", "N"))))
        inner = f"rtsp://admin:{secret}@{host}/live"
        text = f"http://relay.local/proxy?target={quote(inner, safe='')}"
        if draw(st.booleans()):
            text = f"http://outer/?u={quote(text, safe='')}"
    else:  # "password: x" as an error text or a YAML line shows it
        secret = draw(secret_strategy(PARAM_SAFE))
        text = f"{mixed_case(draw, draw(st.sampled_from(['password', 'passwd', 'token', 'secret'])))}: {secret}"
    return text, secret


surroundings = st.tuples(
    st.sampled_from(["", "cannot open ", "source cam: ", "OpenCV(4.10) error: ", "[", "uri="]),
    st.sampled_from(["", " (timeout 10 s)", ": Connection refused", "]", ", retrying in 2 s"]),
)


@settings(max_examples=examples(400))
@given(case=uri_with_secret(), around=surroundings)
def test_no_secret_survives_in_any_form_or_position(case: tuple[str, str], around: tuple[str, str]) -> None:
    text, secret = case
    line = f"{around[0]}{text}{around[1]}"
    assert secret not in redact(line), (line, redact(line))
    assert secret not in mask_credentials(line, None)
    assert secret not in Redactor().text(line)


@pytest.mark.parametrize(("text", "expected"), [
    ("rtsp://admin:secret@cam/x", "rtsp://admin:***@cam/x"),
    ("rtsp://admin:pa#ss@cam/", "rtsp://admin:***@cam/"),
    ("rtsp://admin:p@ss/w?rd@cam:554/s?x=1", "rtsp://admin:***@cam:554/s?x=1"),
    ("rtsp://cam/cgi?User=admin&PassWord=S3cr3t&channel=1", "rtsp://cam/cgi?User=***&PassWord=***&channel=1"),
    ("rtsp://cam:554/user=admin&password=S3cr3t&channel=1&stream=0.sdp",
     "rtsp://cam:554/user=***&password=***&channel=1&stream=0.sdp"),
    ("rtspsrc location=rtsp://cam/x user-id=admin user-pw=s3cret ! appsink",
     "rtspsrc location=rtsp://cam/x user-id=*** user-pw=*** ! appsink"),
    ('rtspsrc user-pw="a b c" ! appsink', 'rtspsrc user-pw="***" ! appsink'),
    ("http://relay/?u=rtsp%3A%2F%2Fadmin%3As3cret%40cam%2F", "http://relay/?u=rtsp://admin:***@cam/"),
    ("--password=abc", "--password=***"),
])
def test_known_forms(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize("text", [
    "http://cam/live@main",  # an @ in a path is not user info
    "device_id=line-1 frame=12 source=cam",
    "config key: model.path is required",
    "rtsp://cam.plant.local:554/Streaming/Channels/101",
    "labeled 12 frames, 3 to review",
    'db.execute("SELECT 1 FROM done WHERE source=? AND key=?", (source, key))',  # a traceback's source line
])
def test_innocent_text_is_left_alone(text: str) -> None:
    assert redact(text) == text


def test_user_info_can_be_dropped_for_keys() -> None:
    assert redact("rtsp://admin:s3cret@cam/x?token=abc", None) == "rtsp://cam/x?token=***"


def test_every_log_line_is_masked_whoever_logs_it() -> None:
    """The daemon's own handlers mask messages, arguments and tracebacks (an OpenCV error quoting the URI)."""
    out = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        setup_logging("info", stream=out, env={})
        other = logging.getLogger("some.library")
        other.warning("opening %s", "rtsp://cam/x?user=admin&password=Zq9hunter2")
        try:
            raise RuntimeError("cannot open rtspsrc user-pw=Zq9gst-secret ! appsink")
        except RuntimeError:
            other.exception("source failed")
        text = out.getvalue()
    finally:
        for h in list(root.handlers):
            if h not in saved[0]:
                root.removeHandler(h)
        root.setLevel(saved[1])
    assert "opening rtsp://cam/x?user=***&password=***" in text
    assert "RuntimeError: cannot open rtspsrc user-pw=*** ! appsink" in text
    assert "Zq9" not in text


@settings(max_examples=examples(50))
@given(secret=secret_strategy(PARAM_SAFE))
def test_the_web_redactor_masks_credential_fields_and_values(secret: str) -> None:
    doc = {"sources": {"cam": {"uri": f"rtsp://cam/s?pwd={secret}", "last_error": f"open failed: user-pw={secret}"}},
           "mqtt": {"password": secret}}
    assert secret not in repr(Redactor().data(doc))



@pytest.mark.parametrize(("url", "expected"), [
    ("rtsp://admin:Zq9raw#hash@127.0.0.1:8554/live", ("127.0.0.1", 8554)),  # urllib read 'Zq9raw' as the port
    ("rtsp://admin:p@ss@cam/x", ("cam", None)),
    ("rtsp://cam/live@main", ("cam", None)),
    ("rtsp://[fe80::1]:8554/x", ("fe80::1", 8554)),
    ("rtsps://cam:554?x=1", ("cam", 554)),
])
def test_host_and_port_of_a_camera_url(url: str, expected: tuple[str, int | None]) -> None:
    assert host_port(url) == expected


def test_a_bad_source_uri_is_refused_without_its_secret() -> None:
    with pytest.raises(ValueError) as info:
        parse_uri("gst://rtspsrc location=rtsp://cam/x user-pw=Zq9gst ! fakesink")
    assert "Zq9" not in str(info.value) and "user-pw=***" in str(info.value)


def test_a_broker_password_on_the_command_line_is_refused_and_the_env_var_named(tmp_path: Path) -> None:
    """``--mqtt mqtt://user:pw@host`` put the password in /proc/<pid>/cmdline for every local user to read."""
    from tests.helpers import run_edgelabel

    proc = run_edgelabel("run", "--mqtt", "mqtt://op:Zq9cmdline@127.0.0.1:1", "--state-dir", str(tmp_path / "s"),
                         timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "EDGELABEL_MQTT_PASSWORD" in proc.stderr and "Zq9" not in proc.stderr + proc.stdout


def test_the_broker_password_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgelabel.edge.cli import parse_mqtt_url

    monkeypatch.setenv("EDGELABEL_MQTT_PASSWORD", "Zq9env")
    assert parse_mqtt_url("mqtts://op@broker:8883") == {"enabled": True, "host": "broker", "port": 8883,
                                                         "username": "op", "password": "Zq9env", "tls": {}}


def test_api_tokens_are_masked_wherever_they_appear() -> None:
    """An ``edgelabel token add`` token pasted into a URL, a header dump or an error text is masked."""
    import secrets

    token = "elt_" + secrets.token_urlsafe(32)
    for text in (f"Authorization: Bearer {token}", f"curl -H 'x: {token}' http://h/api", f"bad token {token}."):
        out = redact(text)
        assert token not in out and token[4:] not in out and "elt_***" in out, out
    assert redact("elt_short") == "elt_short"  # not a token: too short to be one
