"""How the ``imago`` client commands reach the server: the global options
``--tls``, ``--tls-ca``, ``--tls-cert``/``--tls-key`` and ``--token-file``, and
:func:`client_from_args`, which every command that talks to a server uses.

(``imago bench`` opens its own plaintext channels: it measures a server
started for the purpose.)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from imago.client.api import ImagoClient
from imago.client.cli.localfiles import InputError, read

TOKEN_FILE_ENV = "IMAGO_TOKEN_FILE"


def add_connection_options(parser: argparse.ArgumentParser, *, repeated: bool = False) -> None:
    """Adds the TLS and token options to the top-level ``imago`` parser, or
    with ``repeated`` to a client command's, where they may come after the
    command name too (there they default to nothing, so that a value given
    before the command stands unless repeated after it)."""
    group = parser.add_argument_group("connection security (client commands)")
    unset = {"default": argparse.SUPPRESS} if repeated else {}
    add = group.add_argument
    add(
        "--tls",
        action="store_true",
        help="connect with TLS (implied by --tls-ca, --tls-cert)",
        **unset,
    )
    add(
        "--tls-ca",
        type=Path,
        metavar="PEM",
        help="CA certificates to trust (default: system's)",
        **unset,
    )
    add(
        "--tls-cert",
        dest="client_cert",
        type=Path,
        metavar="PEM",
        help="client certificate, for servers requiring mutual TLS (with --tls-key)",
        **unset,
    )
    add("--tls-key", dest="client_key", type=Path, metavar="PEM", help="its private key", **unset)
    token_file = os.environ.get(TOKEN_FILE_ENV)
    add(
        "--token-file",
        type=Path,
        metavar="FILE",
        help=f"send the bearer token this file holds (default: ${TOKEN_FILE_ENV})",
        **(unset or {"default": Path(token_file) if token_file else None}),
    )


def read_token_file(path: Path) -> str:
    """The token in ``path``, surrounding whitespace removed; InputError when
    the file is unreadable, empty or not one line of printable ASCII."""
    token = read(str(path)).decode("ascii", errors="replace").strip()
    if not token:
        raise InputError(f"token file {path} is empty")
    if not all(" " <= char <= "~" for char in token):
        raise InputError(f"token file {path} must hold one line of printable ASCII")
    return token


def security_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`ImagoClient` keyword options of the connection options in
    ``args``; InputError for an unreadable file or a certificate without its key."""
    cert, key = getattr(args, "client_cert", None), getattr(args, "client_key", None)
    if (cert is None) != (key is None):
        raise InputError("--tls-cert and --tls-key go together")
    ca = getattr(args, "tls_ca", None)
    token_file = getattr(args, "token_file", None)
    return {
        "tls": bool(getattr(args, "tls", False)),
        "root_certificates": None if ca is None else read(str(ca)),
        "client_certificate_chain": None if cert is None else read(str(cert)),
        "client_private_key": None if key is None else read(str(key)),
        "token": None if token_file is None else read_token_file(token_file),
    }


def client_from_args(args: argparse.Namespace) -> ImagoClient:
    """A blocking client for ``--target``, ``--timeout`` and the connection
    options; InputError for a target that is not a server address (list)."""
    options = security_options(args)
    try:
        return ImagoClient(args.target, timeout=args.timeout, **options)
    except ValueError as err:
        raise InputError(str(err)) from None
