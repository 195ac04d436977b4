"""Which ``Host`` headers the web page answers: a defence against DNS rebinding.

A page on any site a plant PC visits can point its own DNS name at the appliance's LAN address and read the
answers in the browser, with the browser's ``Host`` header still naming the attacker's site.  Answering only
to the appliance's own names (and to bare IP addresses, which no rebinding can produce) ends that: the
attacker's page gets a 400 and nothing else.

Accepted without configuration: any IP address literal, ``localhost``, this machine's host name (short,
fully qualified and ``.local`` for mDNS) and the configured ``web.host``.  Reverse proxies and DNS aliases
are added with ``web.allowed_hosts`` (``"*"`` turns the check off).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable


def machine_names() -> set[str]:
    """This machine's names, lower-case: host name, FQDN, and the mDNS ``.local`` form."""
    names = {"localhost", "localhost.localdomain"}
    try:
        short = socket.gethostname().strip().lower()
    except OSError:
        short = ""
    if short:
        names |= {short, f"{short.split('.')[0]}.local"}
        try:
            fqdn = socket.getfqdn(short).strip().lower()
        except OSError:
            fqdn = ""
        if fqdn:
            names.add(fqdn)
    return names


def host_name(header: str) -> str:
    """The name in a ``Host`` header, without the port and brackets, lower-case, no trailing dot."""
    value = header.strip().lower()
    if value.startswith("["):  # [IPv6]:port
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%", 1)[0])  # an IPv6 zone id is not part of the address
    except ValueError:
        return False
    return True


class HostCheck:
    """Decides whether a request's ``Host`` names this appliance."""

    def __init__(self, configured: Iterable[str], bind_host: str | None = None) -> None:
        extra = {host_name(h) for h in configured if h and h.strip()}
        self.any = "*" in extra
        self.names = machine_names() | {n for n in extra if n != "*"}
        if bind_host and not is_ip_literal(bind_host):
            self.names.add(host_name(bind_host))

    def allows(self, header: str | None) -> bool:
        if self.any:
            return True
        if not header:
            return False  # HTTP/1.1 requires it; an HTTP/1.0 client without one is not a browser we serve
        name = host_name(header)
        return is_ip_literal(name) or name in self.names
