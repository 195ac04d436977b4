"""Facts about a PEM certificate that an operator compares by eye: SHA-256 fingerprint and expiry.

In ``edge`` (not ``web``) because both the web server's start-up line and ``edgelabel doctor`` show them,
and the doctor must not import the web package.  Only the standard library: ``ssl`` decodes the
certificate (its private ``_test_decode_cert``, present in every CPython 3; the ``cryptography`` package is
used when that is missing).
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path

#: the files ``web.tls: auto`` keeps in state_dir (made by web/tls.py, shown by the doctor)
AUTO_CERT_FILE = "web-tls-cert.pem"
AUTO_KEY_FILE = "web-tls-key.pem"


@dataclass(frozen=True)
class CertInfo:
    """One certificate: its SHA-256 fingerprint as browsers show it (AA:BB:...) and when it stops being valid."""

    fingerprint: str
    not_after: datetime.datetime  # UTC

    @property
    def expired(self) -> bool:
        return self.not_after <= datetime.datetime.now(datetime.timezone.utc)

    @property
    def days_left(self) -> int:
        return (self.not_after - datetime.datetime.now(datetime.timezone.utc)).days


def fingerprint(cert_path: Path) -> str:
    """The first certificate's SHA-256 fingerprint in the file (AA:BB:...).  Raises OSError / ValueError."""
    der = ssl.PEM_cert_to_DER_cert(Path(cert_path).read_text(encoding="ascii"))
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def _not_after(cert_path: Path) -> datetime.datetime:
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is not None:
        info = decode(str(cert_path))
        return datetime.datetime.fromtimestamp(ssl.cert_time_to_seconds(info["notAfter"]), datetime.timezone.utc)
    from cryptography import x509  # pragma: no cover - CPython has _test_decode_cert

    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())  # pragma: no cover
    return cert.not_valid_after_utc  # pragma: no cover


def certificate_info(cert_path: Path) -> CertInfo:
    """Fingerprint and expiry of a PEM certificate.  Raises OSError (unreadable), ValueError or ssl.SSLError
    (not a PEM certificate)."""
    return CertInfo(fingerprint(cert_path), _not_after(cert_path))
