"""LAN discovery over mDNS / DNS-SD (zeroconf, the optional ``inhouse[discovery]`` extra): a
server with ``discovery: true`` (``inhouse serve --advertise``) announces ``_inhouse._tcp`` with a
TXT record saying where it is (``url``, ``grpc``), whether it speaks TLS and whether it needs an
API key — never a key; ``inhouse discover`` lists the servers it hears.

``discovery_interfaces`` pins the addresses zeroconf binds (default: every interface). Binding
127.0.0.1 keeps the announcements on this machine: multicast sent with ``IP_MULTICAST_IF`` on
loopback is looped back by the kernel even where ``lo`` lacks the MULTICAST flag (as in
containers), which is what the tests use."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import asdict, dataclass
from typing import Any

from inhouse import __version__

SERVICE_TYPE = "_inhouse._tcp.local."


class DiscoveryUnavailableError(RuntimeError):
    """zeroconf is not installed."""


def require_discovery() -> None:
    """Raises ``DiscoveryUnavailableError`` unless zeroconf can be imported."""
    _zeroconf()


def _zeroconf() -> Any:
    try:
        import zeroconf
    except ModuleNotFoundError:
        raise DiscoveryUnavailableError(
            "LAN discovery needs the zeroconf package: pip install 'inhouse[discovery]'.") from None
    return zeroconf


@dataclass(frozen=True, slots=True)
class Advert:
    """One server as its TXT record describes it."""

    name: str
    url: str
    tls: bool
    auth: bool
    grpc: str | None
    version: str
    addresses: list[str]
    port: int


def advert_properties(url: str, *, tls: bool, auth: bool, grpc_port: int | None) -> dict[str, str]:
    """The TXT record: where and how to connect. Nothing secret goes here (mDNS is plain text
    to the whole LAN)."""
    props = {"url": url, "tls": "1" if tls else "0", "auth": "1" if auth else "0", "version": __version__,
             "api": "v2,openai,anthropic,ollama"}
    if grpc_port is not None:
        props["grpc"] = str(grpc_port)
    return props


def _addresses(host: str, interfaces: list[str]) -> list[str]:
    """The IPv4 addresses to announce: the one the server binds, else the bound interfaces', else
    every interface's."""
    if host not in ("0.0.0.0", "::", ""):
        try:
            return [socket.gethostbyname(host)]
        except OSError:
            return []
    if interfaces:
        return interfaces
    import ifaddr  # a zeroconf dependency

    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("169.254."):
                out.append(ip.ip)
    return out or ["127.0.0.1"]


class Advertiser:
    """Announces one server while it runs."""

    def __init__(self, *, host: str, http_port: int, grpc_port: int | None, tls: bool, auth: bool,
                 interfaces: list[str] | None = None, instance: str | None = None) -> None:
        zc = _zeroconf()
        self._interfaces = list(interfaces or [])
        addresses = _addresses(host, self._interfaces)
        shown = next((a for a in addresses if not a.startswith("127.")), addresses[0] if addresses else host)
        url = f"{'https' if tls else 'http'}://{shown}:{http_port}"
        hostname = socket.gethostname().split(".")[0] or "inhouse"
        label = instance or f"inhouse on {hostname} ({http_port})"
        self.info = zc.ServiceInfo(
            SERVICE_TYPE, f"{label}.{SERVICE_TYPE}", port=http_port, server=f"{hostname}.local.",
            addresses=[socket.inet_aton(a) for a in addresses],
            properties=advert_properties(url, tls=tls, auth=auth, grpc_port=grpc_port))
        self.url = url
        self._zc: Any = None

    async def start(self) -> None:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncZeroconf

        kw: dict[str, Any] = {"ip_version": IPVersion.V4Only}
        if self._interfaces:
            kw["interfaces"] = self._interfaces
        self._zc = AsyncZeroconf(**kw)
        # allow_name_change: a second server on the same host and port number gets "… (2)"
        await self._zc.async_register_service(self.info, allow_name_change=True)

    async def stop(self) -> None:
        if self._zc is not None:
            zc, self._zc = self._zc, None
            await zc.async_unregister_service(self.info)
            await zc.async_close()


async def discover(timeout_s: float = 3.0, interfaces: list[str] | None = None) -> list[Advert]:
    """The servers that answer within ``timeout_s``, by name."""
    zc_mod = _zeroconf()
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    kw: dict[str, Any] = {"ip_version": zc_mod.IPVersion.V4Only}
    if interfaces:
        kw["interfaces"] = interfaces
    azc = AsyncZeroconf(**kw)
    names: set[str] = set()

    def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        if state_change is not zc_mod.ServiceStateChange.Removed:
            names.add(name)

    browser = AsyncServiceBrowser(azc.zeroconf, [SERVICE_TYPE], handlers=[on_change])
    try:
        await asyncio.sleep(timeout_s)
        found: list[Advert] = []
        for name in sorted(names):
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if not await info.async_request(azc.zeroconf, 1000):
                continue
            found.append(_advert(info))
        return found
    finally:
        await browser.async_cancel()
        await azc.async_close()


def _advert(info: Any) -> Advert:
    props = {k.decode(): (v.decode() if isinstance(v, bytes) else "") for k, v in info.properties.items()}
    name = info.name[: -len(SERVICE_TYPE) - 1] if info.name.endswith("." + SERVICE_TYPE) else info.name
    return Advert(name=name, url=props.get("url", ""), tls=props.get("tls") == "1", auth=props.get("auth") == "1",
                  grpc=props.get("grpc"), version=props.get("version", ""),
                  addresses=list(info.parsed_addresses()), port=int(info.port or 0))


def as_dicts(adverts: list[Advert]) -> list[dict[str, Any]]:
    return [asdict(a) for a in adverts]
