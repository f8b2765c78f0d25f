"""Transport security and bearer-token authentication of ``imago serve``.

- :func:`server_credentials` turns ``--tls-cert``/``--tls-key`` (and
  ``--tls-client-ca`` for mutual TLS) into gRPC server credentials, checking
  the PEM files at start so that a bad file stops the server with a message
  naming it instead of failing every handshake later.
- :class:`TokenAuth` refuses, with UNAUTHENTICATED, every call that does not
  carry ``authorization: Bearer <token>`` with the token of
  ``--auth-token-file``. Health checks and reflection are exempt unless
  ``--auth-health``, so that Kubernetes probes and ``grpcurl list`` work
  without the token.

The token file is read once, at start. SIGHUP does not re-read it (SIGHUP
reloads LoRA adapters): a token is rotated by restarting the server, which a
rolling restart does without downtime, and a token that changes under
running clients without a restart would be harder to reason about.

Anything wrong with these settings raises :class:`SecurityConfigError`,
which ``imago serve`` reports as one line and exits non-zero.
"""

from __future__ import annotations

import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from imago.server.config import ServeConfig

log = logging.getLogger("imago")

#: Method prefixes that need no token unless ``auth_health`` is set: the
#: standard health service and both versions of server reflection.
OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

_AUTHORIZATION = "authorization"


class SecurityConfigError(Exception):
    """A TLS or token setting that keeps the server from starting."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise SecurityConfigError(f"cannot read {what} {path}: {err.strerror or err}") from None


def _never_prompt() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for the
    # passphrase of an encrypted key; gRPC cannot use one anyway.
    return b""


def server_credentials(config: ServeConfig) -> grpc.ServerCredentials | None:
    """gRPC credentials for the listening port; None for plaintext.

    Needs both ``tls_cert`` (certificate chain, PEM) and ``tls_key`` (its
    unencrypted private key, PEM), or neither. With ``tls_client_ca`` (CA
    certificates, PEM) clients must present a certificate one of them signed.
    Raises SecurityConfigError naming the file or option at fault.
    """
    cert, key, client_ca = config.tls_cert, config.tls_key, config.tls_client_ca
    if cert is None and key is None:
        if client_ca is not None:
            raise SecurityConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        given, missing = ("--tls-cert", "--tls-key") if key is None else ("--tls-key", "--tls-cert")
        raise SecurityConfigError(f"{given} needs {missing}: TLS takes a certificate and its key")
    chain = _read(cert, "TLS certificate")
    private_key = _read(key, "TLS key")
    roots = None if client_ca is None else _read(client_ca, "client CA certificate")
    # The standard library parses the same PEM as gRPC's TLS stack and checks
    # that the key belongs to the certificate; gRPC itself would only fail at
    # the first handshake.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_never_prompt)
    except ssl.SSLError as err:
        raise SecurityConfigError(
            f"cannot use TLS certificate {cert} with key {key}: {err.reason or err} "
            "(both must be PEM, the key unencrypted and matching the certificate)"
        ) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as err:
            raise SecurityConfigError(
                f"cannot use client CA certificate {client_ca}: {err.reason or err}"
            ) from None
    return grpc.ssl_server_credentials(
        [(private_key, chain)], root_certificates=roots, require_client_auth=roots is not None
    )


def transport_name(config: ServeConfig) -> str:
    """How the port is secured, for the start-up log: "plaintext", "tls" or "mutual tls"."""
    if config.tls_cert is None:
        return "plaintext"
    return "mutual tls" if config.tls_client_ca is not None else "tls"


def read_token(path: Path) -> str:
    """The bearer token in the file at ``path``, surrounding whitespace removed.

    Raises SecurityConfigError when the file is unreadable, empty, or holds
    what a gRPC metadata value cannot carry (anything but printable ASCII).
    """
    raw = _read(path, "token file")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        token = None
    if not token:
        why = "is empty" if token == "" else "is not ASCII text"
        raise SecurityConfigError(f"token file {path} {why}; it must hold the bearer token")
    if not all(" " <= char <= "~" for char in token):
        raise SecurityConfigError(
            f"token file {path} holds control characters; the token must be one line of "
            "printable ASCII"
        )
    return token


def _refusal(message: str) -> grpc.RpcMethodHandler:
    # A stream-stream handler fits every RPC kind on the wire: it reads no
    # request before answering, so a bidirectional call whose client has not
    # sent anything yet is refused at once instead of waiting for a message.
    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
        log.info("refused a call from %s: %s", context.peer(), message)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.stream_stream_rpc_method_handler(refuse)


class TokenAuth(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` (UNAUTHENTICATED).

    Methods starting with one of ``open_prefixes`` pass without a token. The
    refusal names what is missing and never repeats what the client sent.
    """

    def __init__(self, token: str, open_prefixes: Iterable[str] = OPEN_METHOD_PREFIXES) -> None:
        self._token = token.encode("ascii")
        self._open = tuple(open_prefixes)
        self._missing = _refusal(
            "this server needs a bearer token: send metadata 'authorization: Bearer <token>'"
        )
        self._malformed = _refusal("the 'authorization' metadata is not 'Bearer <token>'")
        self._wrong = _refusal("the bearer token is not valid")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method.startswith(self._open):
            return await continuation(handler_call_details)
        refusal = self._check(handler_call_details.invocation_metadata or ())
        if refusal is None:
            return await continuation(handler_call_details)
        return refusal

    def _check(self, metadata: Iterable[tuple[str, Any]]) -> grpc.RpcMethodHandler | None:
        """None when a value of the authorization key carries the token, else the refusal."""
        values = [value for key, value in metadata if key == _AUTHORIZATION]
        if not values:
            return self._missing
        refusal = self._malformed
        for value in values:
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            scheme, _, credentials = text.strip().partition(" ")
            # The scheme is case-insensitive (RFC 7235); the token is not.
            if scheme.lower() != "bearer" or not credentials.strip():
                continue
            # Constant time, so that response timing tells nothing of the token.
            if hmac.compare_digest(credentials.strip().encode("utf-8"), self._token):
                return None
            refusal = self._wrong
        return refusal


def auth_interceptors(config: ServeConfig) -> list[grpc.aio.ServerInterceptor]:
    """The authentication interceptors ``config`` asks for (none without a
    token file); raises SecurityConfigError for an unusable token file."""
    if config.auth_token_file is None:
        return []
    token = read_token(config.auth_token_file)
    return [TokenAuth(token, () if config.auth_health else OPEN_METHOD_PREFIXES)]
