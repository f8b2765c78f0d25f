"""Python client library and command line of imago.

Importing this package pulls in grpc and the generated stubs only: never torch
and never the server.
"""

from imago.client.api import AsyncImagoClient, ImagoClient, image_bytes
from imago.client.options import (
    DiffusionOptions,
    ImageToImage,
    Inpaint,
    OutputOptions,
    PreviewOptions,
    TextOptions,
)

__all__ = [
    "AsyncImagoClient",
    "DiffusionOptions",
    "ImageToImage",
    "ImagoClient",
    "Inpaint",
    "OutputOptions",
    "PreviewOptions",
    "TextOptions",
    "image_bytes",
]
