"""Python client library and command line of imago.

Importing this package pulls in grpc and the generated stubs only: never torch
and never the server.
"""

from imago.client.api import AsyncImagoClient, ImagoClient, image_bytes

__all__ = ["AsyncImagoClient", "ImagoClient", "image_bytes"]
