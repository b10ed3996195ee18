"""Who a client is, for limits only: its network address, grouped the way one client holds them.

An IPv4 address is one client. An IPv6 client usually holds a whole /64 (privacy addresses
change within it, and any host can pick a new one at will), so its /64 prefix is the client.
Behind a trusted proxy the address is the forwarded one waitress puts in `REMOTE_ADDR`.

A client key never decides who owns an upload: a phone that moves from Wi-Fi to mobile data keeps
its uploads. It only decides whose share of a limit an upload counts against.
"""

from __future__ import annotations

import ipaddress

IPV6_PREFIX = 64


def client_key(address: str | None) -> str | None:
    """`ip:<IPv4 address>` or `ip:<IPv6 /64 prefix>`; None when there is no usable address (a
    UNIX socket, another WSGI server that gives none). Anything else unparsable is kept as it
    is, bounded, so that it still counts as one client."""
    if not address:
        return None
    text = address.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return "addr:" + text[:100]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"ip:{ip.ipv4_mapped}"
        network = ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False)
        return f"ip:{network}"
    return f"ip:{ip}"


def explicit_proxies(trusted_proxy: str | None) -> list[str]:
    """The addresses of `--trusted-proxy` when it names them (waitress takes one address; `*`
    trusts every peer and names none, so no peer's connections are counted as many clients)."""
    if not trusted_proxy or trusted_proxy.strip() == "*":
        return []
    return [part.strip() for part in trusted_proxy.split(",") if part.strip()]
