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
    try:  # an internationalised name travels as its ASCII form (Host header, TLS, DNS)
        host = (
            parts.hostname.encode("idna").decode("ascii") if not parts.hostname.isascii() else parts.hostname
        )
    except UnicodeError as exc:
        raise UrlRefused(f"the host {parts.hostname!r} is not a valid name") from exc
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known prefix: the last 32 bits are IPv4
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # local-use NAT64: anything behind it
_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated IPv4-compatible addresses


def public(address: str) -> bool:
    """A global unicast address, and so is any IPv4 address it carries (mapped, NAT64, 6to4,
    Teredo, IPv4-compatible): ``[64:ff9b::a9fe:a9fe]`` is the metadata service behind NAT64."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            return False
        embedded: list[ipaddress.IPv4Address] = []
        if ip.ipv4_mapped is not None:
            embedded.append(ip.ipv4_mapped)
        if ip in _NAT64 or ip in _COMPATIBLE:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None:
            embedded.append(ip.sixtofour)
        if ip.teredo is not None:
            embedded.extend(ip.teredo)
        if any(not (v4.is_global and not v4.is_multicast) for v4 in embedded):
            return False
        if embedded and ip.ipv4_mapped is not None:
            return True  # a mapped public IPv4 address is that address
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
    shown = host if parts.port is None else f"{host}:{port}"
    if ":" in host:  # an IPv6 literal
        shown = f"[{host}]" if parts.port is None else f"[{host}]:{port}"
    return Target(url=pinned, host=shown, sni=host if scheme == "https" else None)
