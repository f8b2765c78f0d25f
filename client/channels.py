"""Opening client channels to an imago server: plaintext or TLS (optionally
with a client certificate, for mutual TLS), and a bearer token on every call.

With TLS the token travels as gRPC call credentials, the standard mechanism.
gRPC refuses call credentials on a plaintext channel, so there a client
interceptor adds the same ``authorization: Bearer <token>`` metadata: that
suits a server behind a TLS-terminating proxy, or on localhost, and sends the
token in the clear otherwise.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

#: Channel options, as gRPC takes them: (name, value) pairs.
Options = Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class Security:
    """How a client reaches the server; the default is plaintext, no token.

    TLS is on when ``tls`` is set or any certificate is given. Certificates
    and keys are PEM bytes: ``root_certificates`` the CAs to trust (default:
    the system's), ``client_certificate_chain`` with ``client_private_key``
    the client's own, for servers that require one. ``server_name_override``
    is the name the server certificate must carry when it differs from the
    target's host (tests, SSH tunnels).
    """

    tls: bool = False
    root_certificates: bytes | None = None
    client_certificate_chain: bytes | None = None
    client_private_key: bytes | None = None
    token: str | None = None
    server_name_override: str | None = None

    def __post_init__(self) -> None:
        if (self.client_certificate_chain is None) != (self.client_private_key is None):
            raise ValueError("client_certificate_chain and client_private_key go together")
        if self.token is not None and not _header_safe(self.token):
            raise ValueError("token must be non-empty printable ASCII without surrounding spaces")

    @property
    def uses_tls(self) -> bool:
        return (
            self.tls
            or self.root_certificates is not None
            or self.client_certificate_chain is not None
            or self.server_name_override is not None
        )

    def options(self) -> list[tuple[str, Any]]:
        """Channel options these settings add."""
        if self.server_name_override is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name_override)]

    def credentials(self) -> grpc.ChannelCredentials | None:
        """Channel credentials (with the token as call credentials); None for plaintext."""
        if not self.uses_tls:
            return None
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.client_private_key,
            certificate_chain=self.client_certificate_chain,
        )
        if self.token is None:
            return credentials
        return grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(self.token)
        )

    def plaintext_token(self) -> str | None:
        """The token to add by interceptor: only on a plaintext channel."""
        return None if self.uses_tls else self.token


def _header_safe(token: str) -> bool:
    return bool(token) and token == token.strip() and all(" " <= c <= "~" for c in token)


def open_channel(target: str, options: Options, security: Security) -> grpc.Channel:
    """A blocking channel to ``target`` secured as ``security`` says."""
    options = [*options, *security.options()]
    credentials = security.credentials()
    if credentials is not None:
        return grpc.secure_channel(target, credentials, options=options)
    channel = grpc.insecure_channel(target, options=options)
    token = security.plaintext_token()
    return channel if token is None else grpc.intercept_channel(channel, _TokenMetadata(token))


def open_aio_channel(target: str, options: Options, security: Security) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel to ``target`` secured as ``security`` says."""
    options = [*options, *security.options()]
    credentials = security.credentials()
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=options)
    token = security.plaintext_token()
    interceptors = None if token is None else [_AioTokenMetadata(token)]
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


def _bearer(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    """Call details with the token added (the blocking API wants a new object)."""


class _TokenMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call of a blocking channel."""

    def __init__(self, token: str) -> None:
        self._entry = _bearer(token)

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self._entry],
            details.credentials,
            details.wait_for_ready,
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class _AioTokenMetadata(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call of a ``grpc.aio`` channel."""

    def __init__(self, token: str) -> None:
        self._entry = _bearer(token)

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*tuple(details.metadata or ()), self._entry)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)
