"""Where webhooks may go (the SSRF guard): http(s) URLs of at most 2,000 characters, without
credentials, whose host resolves only to public addresses. Loopback, private, link-local,
shared, multicast and reserved addresses are refused unless ``TALLY_WEBHOOK_ALLOW_PRIVATE=1``.

The check runs when an endpoint is registered and again before every attempt; the attempt
then connects to the very address that was checked (``Target``), so a name that resolves to a
public address at registration and to an internal one later (DNS rebinding) is refused too."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

MAX_URL = 2000


class UrlRefused(ValueError):
    """Why a URL may not receive webhooks; ``private`` when only its address is the reason."""

    def __init__(self, message: str, *, private: bool = False) -> None:
        super().__init__(message)
        self.private = private


@dataclass(frozen=True)
class Target:
    """An attempt's connection: ``url`` names the checked address; ``host`` (the Host header)
    and ``sni`` (the TLS server name, checked against the certificate) keep the URL's name."""

    url: str
    host: str
    sni: str | None


def parse(url: str) -> tuple[str, str, int]:
    """(scheme, hostname, port) of an acceptable URL's form; ``UrlRefused`` otherwise."""
    if len(url) > MAX_URL:
        raise UrlRefused(f"longer than {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlRefused(f"not a URL ({exc})") from exc
    if parts.scheme not in ("http", "https"):
        raise UrlRefused("only http and https URLs receive webhooks")
    if not parts.hostname:
        raise UrlRefused("no host")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("credentials in the URL are not accepted (use the signature)")
    if any(c.isspace() or ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise UrlRefused("blanks or control characters in the URL")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def resolve(host: str, port: int) -> list[str]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise UrlRefused(f"the host {host!r} does not resolve") from exc
    return sorted({str(info[4][0]) for info in infos})


async def check(url: str, *, allow_private: bool) -> Target:
    """The connection an attempt to ``url`` makes, after the guard; ``UrlRefused`` if none."""
    scheme, host, port = parse(url)
    addresses = await resolve(host, port)
    if not addresses:
        raise UrlRefused(f"the host {host!r} does not resolve")
    refused = [a for a in addresses if not public(a)]
    if refused and not allow_private:
        raise UrlRefused(
            f"{host} resolves to a loopback, private or reserved address ({refused[0]})", private=True
        )
    address = addresses[0]
    parts = urlsplit(url)
    literal = f"[{address}]" if ":" in address else address
    netloc = literal if parts.port is None else f"{literal}:{port}"
    pinned = urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
    shown = parts.netloc.rsplit("@", 1)[-1]
    return Target(url=pinned, host=shown, sni=host if scheme == "https" else None)
