"""Spreading a client's calls over several imago servers.

gRPC keeps one long-lived HTTP/2 connection per server address and sends
every call down it, so balancing happens per call only when the channel
knows every server's address and uses the ``round_robin`` policy. A channel
learns the addresses in one of two ways:

- a DNS name that resolves to all of them, such as a Kubernetes headless
  Service (``dns:///imago-headless.ml.svc.cluster.local:50051``). gRPC
  resolves it again whenever a connection drops, so servers that come and go
  are followed; servers started with ``--max-connection-age-s`` close their
  connections now and then, which makes clients pick up new servers too.
- a list of ``HOST:PORT`` targets, resolved once here into one
  ``ipv4:``/``ipv6:`` address list target.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass

#: Target schemes gRPC resolves itself; such targets are passed on unchanged.
GRPC_SCHEMES = ("dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds")

#: The port of a target that names none: imago's, not gRPC's own default (443).
DEFAULT_PORT = 50051

#: Channel options every client channel gets: calls go to each ready address in turn.
ROUND_ROBIN: tuple[tuple[str, str], ...] = (("grpc.lb_policy_name", "round_robin"),)


@dataclass(frozen=True)
class ChannelTarget:
    """What a channel is opened with: the gRPC target string, and the
    authority (``host:port``) that TLS checks the server certificate against
    when the target names addresses rather than the host."""

    uri: str
    authority: str | None = None

    def options(self) -> list[tuple[str, str]]:
        """Channel options: round_robin, plus the authority when there is one."""
        options = list(ROUND_ROBIN)
        if self.authority is not None:
            options.append(("grpc.default_authority", self.authority))
        return options


def channel_target(targets: str | Sequence[str]) -> ChannelTarget:
    """The channel target for one server target or several.

    ``targets`` is a gRPC target (``host:port``, ``dns:///name:port``,
    ``ipv4:a:p,b:p`` …), a comma-separated list of ``HOST:PORT``, or a
    sequence of them. A single target is used as it is (with
    :data:`DEFAULT_PORT` when it names a host only): gRPC resolves a name to
    all its addresses. Several are resolved now (a host's IPv4 addresses
    when it has any, else its IPv6 ones) and joined into one address list;
    TLS then checks every server's certificate against the first target's
    host. ValueError names a malformed or unresolvable entry, or a list that
    mixes IPv4 and IPv6 addresses (gRPC takes one family per list).
    """
    if isinstance(targets, str):
        if _has_scheme(targets):
            return ChannelTarget(targets)
        targets = targets.split(",")
    entries = [entry.strip() for entry in targets]
    if not entries or any(not entry for entry in entries):
        raise ValueError(f"targets must be HOST:PORT entries, got {','.join(entries)!r}")
    if len(entries) == 1:
        return ChannelTarget(_with_port(entries[0]))
    hosts = [_split_host_port(entry) for entry in entries]
    families: set[int] = set()
    addresses: list[str] = []
    for host, port in hosts:
        family, found = _resolve(host, port)
        families.add(family)
        addresses.extend(found)
    if len(families) > 1:
        raise ValueError(
            f"targets {','.join(entries)!r} mix IPv4 and IPv6 addresses; list one family"
        )
    scheme = "ipv4" if families == {socket.AF_INET} else "ipv6"
    first_host, first_port = hosts[0]
    authority = None if _is_address(first_host) else f"{first_host}:{first_port}"
    return ChannelTarget(f"{scheme}:{','.join(dict.fromkeys(addresses))}", authority)


def _has_scheme(target: str) -> bool:
    return target.split(":", 1)[0] in GRPC_SCHEMES and ":" in target


def _with_port(entry: str) -> str:
    """``entry`` with :data:`DEFAULT_PORT` when it names a host only: a name,
    an IPv4 address, or an IPv6 address with or without brackets."""
    if entry.startswith("[") and entry.endswith("]"):
        return f"{entry}:{DEFAULT_PORT}"
    if ":" not in entry:
        return f"{entry}:{DEFAULT_PORT}"
    if _is_address(entry):  # a bare IPv6 address: its colons are not a port
        return f"[{entry}]:{DEFAULT_PORT}"
    return entry


def _split_host_port(entry: str) -> tuple[str, int]:
    host, sep, port = entry.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"target {entry!r} is not HOST:PORT")
    if ":" in host and not _is_address(host):
        raise ValueError(f"target {entry!r} is not HOST:PORT (bracket IPv6 addresses)")
    return host, int(port)


def _is_address(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            pass
    return False


def _resolve(host: str, port: int) -> tuple[int, list[str]]:
    """The family and ``address:port`` strings of ``host``, IPv4 preferred."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ValueError(f"target {host}:{port} does not resolve: {err.strerror}") from None
    by_family: dict[int, list[str]] = {}
    for family, _, _, _, sockaddr in infos:
        if family == socket.AF_INET:
            by_family.setdefault(family, []).append(f"{sockaddr[0]}:{port}")
        elif family == socket.AF_INET6:
            by_family.setdefault(family, []).append(f"[{sockaddr[0]}]:{port}")
    family = socket.AF_INET if socket.AF_INET in by_family else socket.AF_INET6
    if family not in by_family:
        raise ValueError(f"target {host}:{port} has no IP address")
    return family, list(dict.fromkeys(by_family[family]))
