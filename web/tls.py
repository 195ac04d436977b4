"""HTTPS for the web page: the certificate (given, or self-signed in the state folder) and waitress over TLS.

Why this way: waitress speaks plain HTTP only, and the appliance should not need a reverse proxy just to keep
the token and session cookie off the wire.  ``serve_tls`` wraps waitress's listening socket with ``ssl`` and
gives each connection a channel that reads and writes through TLS without blocking the server's event loop:

* the handshake is not done in ``accept`` (a client that stalls it would stall every connection) but on the
  first reads, as OpenSSL does when the socket is non-blocking; "want read/write" means "try again later";
* whatever OpenSSL has already decrypted is drained at once (the event loop only sees the raw socket);
* reads (event loop) and writes (worker threads too, in waitress) on one TLS connection are serialized by a
  lock, since OpenSSL does not allow them at the same time; both are non-blocking, so the lock is brief.

``web.tls: auto`` makes a self-signed certificate on first start, ``web-tls-cert.pem`` and
``web-tls-key.pem`` (0600) in the state folder, kept across restarts, with the machine's names and addresses in
it.  It is made with the ``cryptography`` package when installed, else with the ``openssl`` command; without
either, start-up fails and says to install one.  Its SHA-256 fingerprint and expiry are logged (and shown by
``edgelabel doctor``), so an operator can compare it with what the browser shows on the first visit.
``web.tls: {auto: true, hsts: 31536000}`` (or ``{cert, key, hsts}``) also sends Strict-Transport-Security.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from waitress.channel import HTTPChannel

from edgelabel.edge.certs import AUTO_CERT_FILE, AUTO_KEY_FILE, certificate_info
from edgelabel.edge.config import Config, ConfigError

log = logging.getLogger("edgelabel.web")

CERT_FILE = AUTO_CERT_FILE
KEY_FILE = AUTO_KEY_FILE
#: how long a generated certificate is valid; it is regenerated when it has expired
VALID_DAYS = 5 * 365


class TLSError(ConfigError):
    """HTTPS cannot be set up; the message says which file or package and what to do (a config problem)."""

    def __init__(self, message: str) -> None:
        super().__init__([message])


def certificate_names(cfg: Config) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) a generated certificate is valid for: loopback, this host, web.host, allowed_hosts."""
    dns = {"localhost", socket.gethostname()}
    ips = {"127.0.0.1", "::1"}
    for name in [cfg.web.host, *cfg.web.allowed_hosts]:
        if not name or name in ("*", "0.0.0.0", "::"):
            continue
        try:
            ips.add(str(ipaddress.ip_address(name)))
        except ValueError:
            dns.add(name.lstrip("."))
    try:
        ips.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)
                   if isinstance(info[4][0], str) and "%" not in info[4][0])
    except OSError:
        pass
    return sorted(d for d in dns if d), sorted(ips)


def fingerprint(cert_path: Path) -> str:
    """The certificate's SHA-256 fingerprint, as browsers show it (AA:BB:...)."""
    return certificate_info(cert_path).fingerprint


def _expired(cert_path: Path) -> bool:
    try:
        return certificate_info(cert_path).expired
    except (ssl.SSLError, OSError, KeyError, ValueError, AttributeError):
        return False  # let the TLS context say what is wrong with it


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _generate_with_cryptography(cfg: Config, cert_path: Path, key_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    dns, ips = certificate_names(cfg)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edgelabel {cfg.device_id}"[:64])])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def _generate_with_openssl(openssl: str, cfg: Config, cert_path: Path, key_path: Path) -> None:
    dns, ips = certificate_names(cfg)
    san = ",".join([f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips])
    tmp_key = key_path.with_name(f".{key_path.name}.{os.getpid()}.tmp")
    cmd = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
           "-keyout", str(tmp_key), "-out", str(cert_path), "-days", str(VALID_DAYS),
           "-subj", f"/CN=edgelabel {cfg.device_id}"[:70], "-addext", f"subjectAltName={san}",
           "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0"]
    old_umask = os.umask(0o077)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    finally:
        os.umask(old_umask)
    if done.returncode != 0:
        tmp_key.unlink(missing_ok=True)
        raise TLSError(f"web.tls: auto: openssl could not make a certificate ({done.stderr.strip()[-300:]}); "
                       "install the cryptography package (pip install cryptography) or give web.tls: {cert, key}")
    os.chmod(tmp_key, 0o600)
    os.replace(tmp_key, key_path)


def ensure_self_signed(cfg: Config) -> tuple[Path, Path]:
    """The generated certificate and key in the state folder, made now when absent or expired."""
    cert_path, key_path = cfg.state_path(CERT_FILE), cfg.state_path(KEY_FILE)
    if cert_path.is_file() and key_path.is_file() and not _expired(cert_path):
        return cert_path, key_path
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import cryptography  # noqa: F401
        how = "the cryptography package"
    except ImportError:
        how = ""
    if how:
        _generate_with_cryptography(cfg, cert_path, key_path)
    else:
        openssl = shutil.which("openssl")
        if openssl is None:
            raise TLSError("web.tls: auto needs the cryptography package (pip install cryptography) or the openssl "
                           "command to make a self-signed certificate; install one, or give web.tls: {cert, key}")
        how = openssl
        _generate_with_openssl(openssl, cfg, cert_path, key_path)
    log.info("web: generated a self-signed HTTPS certificate %s (with %s)", cert_path, how)
    return cert_path, key_path


def is_auto(tls: Any) -> bool:
    """``web.tls: auto`` or ``web.tls: {auto: true, ...}``: a self-signed certificate kept in the state folder."""
    return tls == "auto" or (isinstance(tls, dict) and tls.get("auto") is True)


def certificate_path(cfg: Config) -> Path | None:
    """The certificate file ``web.tls`` serves (for ``auto``: where it is, or will be, generated); None: HTTP."""
    tls = cfg.web.tls
    if tls is None:
        return None
    return cfg.state_path(CERT_FILE) if is_auto(tls) else cfg.resolve(tls["cert"])


def hsts_seconds(cfg: Config) -> int | None:
    """``web.tls.hsts``: the Strict-Transport-Security max-age to send over HTTPS; None: no header (the default)."""
    tls = cfg.web.tls
    value = tls.get("hsts") if isinstance(tls, dict) else None
    return None if value is None or value is False else int(value)


def tls_files(cfg: Config) -> tuple[Path, Path] | None:
    """(certificate, key) for ``web.tls``, generated for ``auto``; None for plain HTTP."""
    tls = cfg.web.tls
    if tls is None:
        return None
    if is_auto(tls):
        return ensure_self_signed(cfg)
    return cfg.resolve(tls["cert"]), cfg.resolve(tls["key"])


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context: TLS 1.2 or later, the given certificate chain and key (errors name the files)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for which, path in (("cert", cert), ("key", key)):
        if not path.is_file():
            raise TLSError(f"web.tls: {which} file {path} does not exist; fix web.tls.{which} or use web.tls: auto")
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise TLSError(f"web.tls: cannot use the certificate {cert} with the key {key} ({exc}); they must be PEM "
                       "files that belong together") from None
    return ctx


class TLSChannel(HTTPChannel):  # type: ignore[misc]
    """waitress's HTTP channel over a non-blocking TLS socket (see the module's notes)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._tls_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def handle_read(self) -> None:
        sock = self.socket
        try:
            with self._tls_lock:
                data = sock.recv(self.adj.recv_bytes)
                while data and sock.pending():
                    data += sock.recv(sock.pending())
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return  # the handshake or a record is not complete yet
        except OSError:  # ssl.SSLError included: plain HTTP on the HTTPS port, a broken handshake, a reset
            self.handle_close()
            return
        if not data:
            self.handle_close()
            return
        self.last_activity = time.time()
        self.received(data)

    def send(self, data: bytes, do_close: bool = True) -> int:
        try:
            with self._tls_lock:
                return int(self.socket.send(data))
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return 0
        except OSError:
            if do_close:
                self.handle_close()
            return 0


def serve_tls(server: Any, context: ssl.SSLContext) -> None:
    """Turn a waitress server (not yet running) into an HTTPS one."""
    server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    server.channel_class = TLSChannel
