"""Hypothesis strategies for the fuzz suite: requests of every RPC with
malformed, extreme and adversarial fields and images.

Every strategy gives a :class:`Case`: the request and, for each image in it,
how the image was made. Images made "valid" (a well-formed PNG, JPEG or WebP
within the server's limits, sent with an empty or correct MIME type) must never
be what a request is rejected for; everything else may be rejected, but only
with a status that names the field at fault.

Requests the server accepts must stay cheap, so that a run of hundreds of
cases takes seconds on a CPU: generation requests whose resolved size, steps
and image count would cost more than a small budget are scaled down before they
are sent (invalid values are kept as they are: they never run).
"""

from __future__ import annotations

import functools
import io
import math
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import Message
from hypothesis import strategies as st
from PIL import Image

from imago.server.config import Limits
from imago.v1 import align_pb2, caption_pb2, common_pb2, imagegen_pb2, vqa_pb2

LIMITS = Limits()
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
I32_MIN, I32_MAX = -(2**31), 2**31 - 1

#: Most pixel-steps (width x height x steps x images) an accepted generation
#: request may cost: about a third of a second on the tiny model on one core.
GENERATION_BUDGET = 256 * 256 * 3 * 2


# ------------------------------------------------------------------ images


@dataclass(frozen=True)
class FuzzImage:
    """Encoded image bytes as sent, and whether every image field must take them."""

    data: bytes
    mime_type: str = ""
    # A decodable PNG, JPEG or WebP within the limits, with an empty or right MIME type.
    valid: bool = False
    # How it was made, for reports ("png RGBA 3x1", "truncated", ...).
    kind: str = ""
    # Pixel size when known (valid images), else None.
    size: tuple[int, int] | None = None
    # Width and height the client claims: output-only fields the server ignores.
    claimed: tuple[int, int] = (0, 0)

    def __repr__(self) -> str:
        return (
            f"FuzzImage({self.kind!r}, {len(self.data)} bytes, mime={self.mime_type!r}, "
            f"valid={self.valid})"
        )

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        # Hypothesis prints failing examples with this: bytes in full are unreadable.
        printer.text(repr(self))

    def proto(self) -> common_pb2.Image:
        width, height = self.claimed
        return common_pb2.Image(
            data=self.data, mime_type=self.mime_type, width=width, height=height
        )


MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}

# Modes each format can store as such; others are converted first.
STORABLE = {
    "PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"),
    "JPEG": ("L", "RGB", "CMYK"),
    "WEBP": ("RGB", "RGBA"),
}
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "I;16", "I", "CMYK", "F")


def _pixels(mode: str, size: tuple[int, int], seed: int, pattern: str) -> Image.Image:
    """A ``mode`` image of ``size`` that is noise, a flat colour or a gradient."""
    width, height = size
    rng = np.random.default_rng(seed)
    if pattern == "flat":
        base = np.full((height, width, 3), rng.integers(0, 256, 3), dtype=np.uint8)
    elif pattern == "gradient":
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 7, y * 5, x + y], -1).astype(np.uint8)
    else:
        base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(base, "RGB")
    if mode == "I;16":
        wide = (base[..., 0].astype(np.uint16) << 8) | base[..., 1]
        return Image.fromarray(wide)
    if mode in ("P", "PA"):
        image = image.quantize(colors=16)
        if mode == "PA":
            image = image.convert("PA")
        else:
            image.info["transparency"] = 0
        return image
    return image.convert(mode)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


#: PNG colour type -> (channels, bit depths the PNG specification allows).
PNG_COLOR_TYPES = {0: (1, (1, 2, 4, 8, 16)), 2: (3, (8, 16)), 3: (1, (1, 2, 4, 8))}
PNG_COLOR_TYPES |= {4: (2, (8, 16)), 6: (4, (8, 16))}
# Adam7 passes: (first column, first row, column step, row step).
ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2)]
ADAM7 += [(0, 1, 1, 2)]


def _png_rows(samples: np.ndarray, bit_depth: int) -> bytes:
    """Scanlines of ``samples`` [h, w, channels], each after filter byte 0."""
    rows = []
    for row in samples:
        flat = row.reshape(-1)
        if bit_depth == 16:
            packed = flat.astype(">u2").tobytes()
        elif bit_depth == 8:
            packed = flat.astype(np.uint8).tobytes()
        else:
            shifts = np.arange(bit_depth - 1, -1, -1)
            bits = ((flat[:, None].astype(np.uint8) >> shifts) & 1).astype(np.uint8)
            packed = np.packbits(bits.reshape(-1)).tobytes()
        rows.append(b"\x00" + packed)
    return b"".join(rows)


def png_raw(
    size: tuple[int, int], color_type: int, bit_depth: int, seed: int, interlaced: bool
) -> bytes:
    """A complete PNG of random samples in any colour type and bit depth the
    specification allows, Adam7-interlaced or not: kinds PIL cannot write."""
    width, height = size
    channels, _ = PNG_COLOR_TYPES[color_type]
    top = 2 ** min(bit_depth, 8) if color_type == 3 else 2**bit_depth
    samples = np.random.default_rng(seed).integers(0, top, (height, width, channels))
    chunks = _png_chunk(
        b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, interlaced)
    )
    if color_type == 3:
        chunks += _png_chunk(b"PLTE", bytes(i * 37 % 256 for i in range(3 * top)))
        chunks += _png_chunk(b"tRNS", bytes([0, 128]))
    if interlaced:
        passes = [samples[y0::dy, x0::dx] for x0, y0, dx, dy in ADAM7]
        raw = b"".join(_png_rows(p, bit_depth) for p in passes if p.size)
    else:
        raw = _png_rows(samples, bit_depth)
    chunks += _png_chunk(b"IDAT", zlib.compress(raw))
    return b"\x89PNG\r\n\x1a\n" + chunks + _png_chunk(b"IEND", b"")


@st.composite
def raw_pngs(draw, max_side: int = 48) -> FuzzImage:
    """A PNG of any colour type and bit depth, interlaced or not."""
    color_type = draw(st.sampled_from(sorted(PNG_COLOR_TYPES)))
    bit_depth = draw(st.sampled_from(PNG_COLOR_TYPES[color_type][1]))
    size = (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    interlaced = draw(st.booleans())
    data = png_raw(size, color_type, bit_depth, draw(st.integers(0, 2**16)), interlaced)
    kind = f"png type {color_type} depth {bit_depth}{' interlaced' if interlaced else ''}"
    return FuzzImage(data, draw(_mime_for("PNG")), True, kind, size)


@st.composite
def valid_images(draw, max_side: int = 96) -> FuzzImage:
    """A well-formed small PNG, JPEG or WebP of a random mode and size, 1x1 and
    1-pixel strips included, sometimes animated, progressive or with metadata."""
    if draw(st.integers(0, 5)) == 0:
        return draw(raw_pngs(max_side=min(max_side, 48)))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "WEBP"]))
    side = st.one_of(st.integers(1, 4), st.integers(1, max_side))
    size = (draw(side), draw(side))
    mode = draw(st.sampled_from(MODES))
    seed = draw(st.integers(0, 2**16))
    pattern = draw(st.sampled_from(["noise", "flat", "gradient"]))
    image = _pixels(mode, size, seed, pattern)
    if image.mode == "I" and fmt == "PNG":
        image = image.convert("I;16")
    if image.mode not in STORABLE[fmt]:
        target = "RGBA" if "A" in image.mode and fmt != "JPEG" else "RGB"
        image = image.convert(target)
    options: dict = {}
    extra = draw(st.sampled_from(["plain", "animated", "lossless", "progressive", "exif", "mpo"]))
    if extra == "animated" and fmt in ("PNG", "WEBP"):
        frames = [_pixels(image.mode, size, seed + i, "noise") for i in (1, 2)]
        frames = [f if f.mode == image.mode else f.convert(image.mode) for f in frames]
        options.update(save_all=True, append_images=frames, duration=50, loop=0)
    elif extra == "lossless" and fmt == "WEBP":
        options["lossless"] = True
    elif extra == "progressive" and fmt == "JPEG":
        options.update(progressive=True, quality=draw(st.integers(1, 100)))
    elif extra == "exif" and fmt in ("JPEG", "PNG", "WEBP"):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(1, 8))  # orientation
        exif[0x010E] = "\x00fuzz\xff"  # description
        options["exif"] = exif.tobytes()
    elif extra == "mpo" and fmt == "JPEG":
        # A multi-picture JPEG, as cameras and phones write: still a JPEG.
        second = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        data = _encode(image, "MPO", save_all=True, append_images=[second])
        mime = draw(_mime_for("JPEG"))
        return FuzzImage(data, mime, True, f"mpo {image.mode} {size[0]}x{size[1]}", size)
    data = _encode(image, fmt, **options)
    mime = draw(_mime_for(fmt))
    kind = f"{fmt.lower()} {image.mode} {size[0]}x{size[1]} {extra}"
    claimed = draw(st.sampled_from([(0, 0), (0, 0), (0, 0), (1, 1), (U32_MAX, U32_MAX)]))
    return FuzzImage(data, mime, True, kind, size, claimed)


def _mime_for(fmt: str) -> st.SearchStrategy[str]:
    """An empty or right MIME type for ``fmt``, in any letter case."""
    return st.sampled_from(["", MIME[fmt], MIME[fmt].upper(), MIME[fmt].title()])


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int, idat: bytes = b"", color_type: int = 0) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (each up to 2**32-1),
    with ``idat`` as its only pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    chunks = _png_chunk(b"IHDR", header)
    if idat:
        chunks += _png_chunk(b"IDAT", idat)
    return b"\x89PNG\r\n\x1a\n" + chunks + _png_chunk(b"IEND", b"")


@functools.lru_cache(maxsize=16)
def png_bomb(width: int, height: int) -> bytes:
    """A real, complete greyscale PNG of ``width`` x ``height`` black pixels:
    kilobytes on the wire, megapixels once decoded."""
    row = b"\x00" * (width + 1)  # filter byte, then the pixels
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return png_claiming(width, height, body)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header is patched to claim ``width`` x
    ``height`` (each up to 65535); its data then ends far too early."""
    data = bytearray(_encode(Image.new("RGB", (16, 16), (9, 99, 199)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_claiming(width: int, height: int) -> bytes:
    """A small lossy WebP whose VP8 frame header is patched to claim ``width``
    x ``height`` (each up to 16383)."""
    data = bytearray(_encode(Image.new("RGB", (16, 16), (9, 99, 199)), "WEBP", quality=50))
    start = data.index(b"\x9d\x01\x2a")
    data[start + 3 : start + 7] = struct.pack("<HH", width & 0x3FFF, height & 0x3FFF)
    return bytes(data)


def _jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, bytes) of each segment of a JPEG up to its end marker; a scan's
    bytes run to the next marker."""
    segments, at = [], 2
    while data[at + 1] != 0xD9:
        marker = data[at + 1]
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        end = at + 2 + length
        if marker == 0xDA:
            # 0xFF00 is an escaped 0xFF and 0xFFD0..D7 are restart markers.
            while data[end] != 0xFF or data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                end += 1
        segments.append((marker, data[at:end]))
        at = end
    return segments


@functools.lru_cache(maxsize=16)
def jpeg_scan_bomb(width: int, height: int, repeats: int) -> bytes:
    """A progressive JPEG claiming ``width`` x ``height`` whose scans after the
    first repeat ``repeats`` times (about nine scans each): tiny on the wire,
    and every scan makes the decoder pass over the whole image."""
    image = Image.new("RGB", (64, 64), (10, 200, 30))
    segments = _jpeg_segments(_encode(image, "JPEG", progressive=True, quality=90))
    first = next(i for i, (marker, _) in enumerate(segments) if marker == 0xDA)
    out = bytearray(b"\xff\xd8")
    for marker, segment in segments[: first + 1]:
        if marker == 0xC2:  # progressive frame header: patch the size
            segment = segment[:5] + struct.pack(">HH", height, width) + segment[9:]
        out += segment
    for _ in range(repeats):
        out += b"".join(segment for _, segment in segments[first + 1 :])
    return bytes(out + b"\xff\xd9")


MAGICS = [
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"\x00\x00\x01\x00",
    b"%PDF-1.4",
    b"<svg xmlns='http://www.w3.org/2000/svg'>",
    b"PK\x03\x04",
]


@st.composite
def broken_images(draw) -> FuzzImage:
    """Bytes that are not a usable image, or are one only in part: empty,
    random, truncated, bit-flipped, other formats, polyglots, headers that
    claim huge or zero sizes, decompression bombs."""
    kind = draw(
        st.sampled_from(
            [
                "empty", "random", "magic+random", "truncated", "flipped", "gif",
                "animated gif", "bmp", "tiff", "polyglot", "png claims", "png bomb",
                "jpeg claims", "jpeg scans", "webp claims", "zero size",
            ]
        )
    )  # fmt: skip
    if kind == "empty":
        data = b""
    elif kind == "random":
        data = draw(st.binary(min_size=1, max_size=512))
    elif kind == "magic+random":
        data = draw(st.sampled_from(MAGICS)) + draw(st.binary(max_size=256))
    elif kind in ("truncated", "flipped", "polyglot"):
        good = draw(valid_images(max_side=48)).data
        if kind == "truncated":
            data = good[: draw(st.integers(1, max(1, len(good) - 1)))]
        elif kind == "flipped":
            data = bytearray(good)
            for _ in range(draw(st.integers(1, 8))):
                at = draw(st.integers(0, len(data) - 1))
                data[at] ^= draw(st.integers(1, 255))
            data = bytes(data)
        else:
            tail = draw(st.sampled_from(MAGICS)) + draw(st.binary(max_size=64))
            data = draw(st.sampled_from([good + tail, tail + good, good[:40] + tail + good[40:]]))
    elif kind in ("gif", "animated gif", "bmp", "tiff"):
        fmt = {"gif": "GIF", "animated gif": "GIF", "bmp": "BMP", "tiff": "TIFF"}[kind]
        image = _pixels("RGB", (draw(st.integers(1, 32)), draw(st.integers(1, 32))), 1, "noise")
        options = {}
        if kind == "animated gif":
            options = {"save_all": True, "append_images": [image.rotate(90)], "duration": 40}
        data = _encode(image, fmt, **options)
    elif kind == "png claims":
        side = st.one_of(
            st.sampled_from([0, 1, 12_000, 12_001, 65_535, 2**31 - 1, 2**31, U32_MAX]),
            st.integers(0, U32_MAX),
        )
        data = png_claiming(draw(side), draw(side), draw(st.binary(max_size=64)))
    elif kind == "png bomb":
        # Under the pixel limit (accepted from the header: the worker decodes
        # it), at the longest side, and over either limit.
        sizes = [(4000, 2500), (12_000, 1), (1, 12_000), (7000, 6000), (12_001, 1)]
        width, height = draw(st.sampled_from(sizes))
        data = png_bomb(width, height)
    elif kind == "jpeg claims":
        side = st.sampled_from([0, 1, 3000, 11_999, 12_001, 65_535])
        data = jpeg_claiming(draw(side), draw(side))
    elif kind == "jpeg scans":
        # Around the scan limit, on small and on large images.
        width, height = draw(st.sampled_from([(64, 64), (3000, 3000), (6000, 6000)]))
        data = jpeg_scan_bomb(width, height, draw(st.sampled_from([1, 10, 11, 12, 100])))
    elif kind == "webp claims":
        side = st.sampled_from([1, 3000, 11_000, 16_383])
        data = webp_claiming(draw(side), draw(side))
    else:  # zero size
        data = png_claiming(draw(st.sampled_from([0, 1])), 0, zlib.compress(b"\x00"))
    mime = draw(mime_types())
    return FuzzImage(data, mime, False, kind)


def mime_types() -> st.SearchStrategy[str]:
    """MIME types right and wrong for any format, and nonsense."""
    return st.one_of(
        st.sampled_from(
            [
                "", "image/png", "image/jpeg", "image/webp", "image/gif", "image/jpg",
                "IMAGE/PNG", "image/png; charset=binary", "application/octet-stream",
                "text/html", " image/png", "\x00", "image/*",
            ]
        ),
        st.text(max_size=40),
    )  # fmt: skip


@st.composite
def wrong_mime_images(draw) -> FuzzImage:
    """A valid image sent with a MIME type that may contradict it."""
    image = draw(valid_images(max_side=48))
    mime = draw(mime_types())
    fmt = image.kind.split(" ")[0].upper().replace("MPO", "JPEG")
    valid = mime.lower() in ("", MIME[fmt])
    return FuzzImage(image.data, mime, valid, image.kind + " (mime)", image.size)


def images() -> st.SearchStrategy[FuzzImage]:
    """Any image a client might send, good or bad; good ones half the time."""
    return st.one_of(valid_images(), valid_images(), broken_images(), wrong_mime_images())


# ------------------------------------------------------------ field values

SPECIAL_TEXT = [
    "", " ", "\x00", "\t\n\r", "\u200b", "\ufeff", "\u202e", "a\u0301", "🦊", "ß",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "<image>", "</s>", "<s>", "<pad>", "<unk>", "<|endoftext|>",
    "<|startoftext|>", "[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]", "Question:",
    "Answer:", "%s%n%x", "{0}", "${jndi:x}", "../../etc/passwd", "\\x00", "a red fox",
    "a photo of", "what colour is it?",
]  # fmt: skip


def short_texts() -> st.SearchStrategy[str]:
    """Short strings from the special list, random Unicode, or both joined."""
    piece = st.one_of(st.sampled_from(SPECIAL_TEXT), st.text(max_size=12))
    return st.lists(piece, max_size=4).map("".join)


def texts() -> st.SearchStrategy[str]:
    """Short strings, and long ones of exactly a length near the server's limit."""
    lengths = st.sampled_from([100, 1000, LIMITS.max_prompt_chars, LIMITS.max_prompt_chars + 1])
    long = st.builds(lambda s, n: ((s or "ab ") * n)[:n], short_texts(), lengths)
    return st.one_of(short_texts(), short_texts(), short_texts(), long)


def floats() -> st.SearchStrategy[float]:
    """32-bit floats: special values, boundaries, anything."""
    return st.one_of(
        st.sampled_from(
            [
                0.0, -0.0, 1e-45, 1e-38, 1e-7, 0.01, 0.5, 0.7, 1.0, 1.5, 2.0, 4.0, 4.01,
                10.0, 10.01, 30.0, 30.01, -1.0, -4.0, -10.0, -10.01, 3.4e38, math.nan,
                math.inf, -math.inf,
            ]
        ),
        st.floats(width=32),
        st.floats(0.125, 2.0, width=32),
    )  # fmt: skip


def maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """``strategy``'s values or None (the field stays unset)."""
    return st.one_of(st.none(), strategy)


def uint32s(*usual: int) -> st.SearchStrategy[int]:
    """Mostly ``usual`` values, sometimes anything a uint32 holds."""
    return st.one_of(
        st.sampled_from(usual), st.sampled_from(usual), st.sampled_from([0, 1, U32_MAX])
    )


def enums(*known: int) -> st.SearchStrategy[int]:
    """Known enum values and unknown ones (proto3 enums are open)."""
    return st.one_of(
        st.sampled_from(known), st.sampled_from([-1, 4, 17, I32_MIN, I32_MAX]), st.integers(-5, 9)
    )


def set_fields(message: Message, values: dict) -> Message:
    """Set every value that is not None on ``message``; returns it."""
    for name, value in values.items():
        if isinstance(value, Message):
            getattr(message, name).CopyFrom(value)
        elif value is not None:
            setattr(message, name, value)
    return message


# ---------------------------------------------------------------- requests


@dataclass
class Case:
    """A request and how each of its images was made, by field path
    ("image", "images[2]", "image_to_image.init_image")."""

    request: Message
    images: dict[str, FuzzImage] = field(default_factory=dict)
    # For explicit examples: "OK" when the call must succeed, else the one
    # field its rejection must name. None: any allowed outcome.
    expect: str | None = None

    def __repr__(self) -> str:
        shown = type(self.request)()
        shown.CopyFrom(self.request)
        _elide_bytes(shown)
        text = str(shown).replace("\n", " ")
        if len(text) > 1500:
            text = text[:1500] + "..."
        expect = f" expect={self.expect!r}" if self.expect else ""
        return f"Case({type(self.request).__name__}: {text} images={self.images!r}{expect})"

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        printer.text(repr(self))


def _elide_bytes(message: Message) -> None:
    """Replace every bytes field of ``message`` (recursively) by its length."""
    for descriptor, value in message.ListFields():
        if descriptor.type == descriptor.TYPE_BYTES:
            setattr(message, descriptor.name, f"<{len(value)} bytes>".encode())
        elif descriptor.type == descriptor.TYPE_MESSAGE:
            children = value if descriptor.is_repeated else [value]
            for child in children:
                _elide_bytes(child)


@st.composite
def fields(
    draw, choices: dict[str, tuple[st.SearchStrategy, st.SearchStrategy]], tame: bool = False
) -> dict:
    """A value per field name from its (tame, wild) pair of strategies. Tame
    values are valid (alone and together); wild ones anything. A case takes no
    field, one or two, or every field from the wild side (none when ``tame``),
    so that accepted requests are common and every field gets its turn."""
    names = sorted(choices)
    mode = "tame" if tame else draw(st.sampled_from(["tame", "one", "one", "two", "wild"]))
    if mode == "tame":
        wild = set()
    elif mode == "one":
        wild = {draw(st.sampled_from(names))}
    elif mode == "two":
        wild = draw(st.sets(st.sampled_from(names), min_size=min(2, len(names)), max_size=2))
    else:
        wild = set(names)
    return {name: draw(choices[name][1] if name in wild else choices[name][0]) for name in choices}


def tame_floats(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(low, high, width=32)


def tame_texts() -> st.SearchStrategy[str]:
    words = st.sampled_from(["a", "red", "fox", "photo", "of", "the", "cat", "what", "is", "?"])
    return st.lists(words, min_size=1, max_size=6).map(" ".join)


@st.composite
def generation_settings(draw, tame: bool = False) -> common_pb2.GenerationSettings | None:
    """Settings with any mix of fields set, cheap when valid; when not
    ``tame``, sometimes none at all (the defaults: 30 new tokens)."""
    if not tame and draw(st.integers(0, 3)) == 0:
        return None
    choices = {
        "max_new_tokens": (
            st.integers(1, 8),
            maybe(uint32s(1, 2, 3, 5, 8, 120, 200, 256, 257)),
        ),
        "min_new_tokens": (maybe(st.integers(0, 1)), maybe(uint32s(0, 1, 2, 4, 9))),
        "num_beams": (maybe(st.integers(1, 4)), maybe(uint32s(1, 2, 3, 4, 16, 17))),
        "do_sample": (maybe(st.booleans()), maybe(st.booleans())),
        "temperature": (maybe(tame_floats(0.125, 2.0)), maybe(floats())),
        "top_p": (maybe(tame_floats(0.125, 1.0)), maybe(floats())),
        "top_k": (maybe(st.integers(0, 100)), maybe(uint32s(0, 1, 5, 50, 1000, 1001))),
        "repetition_penalty": (maybe(tame_floats(0.5, 2.0)), maybe(floats())),
        "num_return_sequences": (maybe(st.just(1)), maybe(uint32s(1, 2, 3, 16, 17))),
        "length_penalty": (maybe(tame_floats(-2.0, 2.0)), maybe(floats())),
        "seed": (
            maybe(st.integers(0, U64_MAX)),
            maybe(st.sampled_from([0, 1, 2**63, U64_MAX])),
        ),
    }
    settings = set_fields(common_pb2.GenerationSettings(), draw(fields(choices, tame)))
    # Long generations are valid and slow on one core (30 tokens when unset):
    # keep wide searches short. Lengths past the model's positions stay, as
    # they never run.
    wide = settings.num_beams * max(1, settings.num_return_sequences) > 2
    unset = not settings.HasField("max_new_tokens")
    if wide and (unset or 8 < settings.max_new_tokens <= 128):
        settings.max_new_tokens = 8
    return settings


def image_fields() -> tuple[st.SearchStrategy, st.SearchStrategy]:
    """(tame, wild) strategies for an image field: a valid image, or any image
    or none at all."""
    return valid_images(), st.one_of(st.none(), images())


def _images_of(values: dict, paths: list[str]) -> dict[str, FuzzImage]:
    """Turn the FuzzImages among ``values`` into protos; return them by path."""
    found = {}
    for path in paths:
        image = values.get(path)
        if image is not None:
            found[path] = image
            values[path] = image.proto()
    return found


@st.composite
def caption_requests(draw) -> Case:
    values = draw(
        fields(
            {
                "image": image_fields(),
                "prefix": (st.one_of(st.none(), st.just("a photo of"), tame_texts()), texts()),
                "generation": (generation_settings(tame=True), generation_settings()),
            }
        )
    )
    found = _images_of(values, ["image"])
    return Case(set_fields(caption_pb2.CaptionRequest(), values), found)


@st.composite
def ask_requests(draw) -> Case:
    values = draw(
        fields(
            {
                "image": image_fields(),
                "question": (tame_texts(), maybe(texts())),
                "generation": (generation_settings(tame=True), generation_settings()),
            }
        )
    )
    found = _images_of(values, ["image"])
    return Case(set_fields(vqa_pb2.AskRequest(), values), found)


def stream_ids() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(["", "0", "x", "\x00", "🦊" * 50]), st.text(max_size=20))


@st.composite
def caption_streams(draw) -> list[tuple[caption_pb2.CaptionStreamRequest, Case]]:
    """0..5 stream items, each with its own case, ids may repeat; or, now and
    then, more items than the server keeps in flight per stream."""
    items = []
    for _ in range(draw(st.integers(0, 5))):
        case = draw(st.one_of(caption_requests(), st.just(Case(caption_pb2.CaptionRequest()))))
        message = caption_pb2.CaptionStreamRequest(id=draw(stream_ids()), request=case.request)
        items.append((message, case))
    if items and draw(st.integers(0, 9)) == 0:
        many = LIMITS.max_stream_inflight + draw(st.integers(1, 40))
        items = [items[i % len(items)] for i in range(many)]
    return items


@st.composite
def ask_streams(draw) -> list[tuple[vqa_pb2.AskStreamRequest, Case]]:
    items = []
    for _ in range(draw(st.integers(0, 5))):
        case = draw(ask_requests())
        message = vqa_pb2.AskStreamRequest(id=draw(stream_ids()), request=case.request)
        items.append((message, case))
    return items


# ------------------------------------------------------------- generation

SCHEDULERS = ["ddim", "pndm", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_karras", "lms"]
SCHEDULERS += ["unipc"]
ODD_SCHEDULERS = ["DDIM", "euler ", "karras", "\x00", "ddim\x00", "Euler a"]
# Loaded, well-formed but not loaded, malformed.
LORA_NAMES = ["ink", "ink", "A9", "v1.2_soft-light", "x" * 64, "", "../ink", "a/b", ".hidden"]
LORA_NAMES += ["x" * 65, "ink\n", "ink.safetensors/..", "INK"]


def sizes() -> st.SearchStrategy[int]:
    """Output sides: unset, cheap multiples of 8, boundaries, non-multiples, huge."""
    return st.one_of(
        st.sampled_from([0, 64, 72, 128]),
        st.sampled_from([1, 8, 56, 63, 65, 100, 2048, 2049, 2056, 1 << 20, U32_MAX]),
    )


@st.composite
def preview_options(draw) -> imagegen_pb2.PreviewOptions | None:
    if draw(st.booleans()):
        return None
    choices = {
        "every_n_steps": (st.integers(0, 1), uint32s(0, 1, 2, 3, 4)),
        "format": (st.integers(0, 3), enums(0, 1, 2, 3)),
        "max_size": (st.sampled_from([0, 8, 16, 64, 256]), uint32s(0, 1, 7, 8, 2048, 2049)),
        "method": (st.integers(0, 3), enums(0, 1, 2, 3)),
        "all_images": (st.booleans(), st.booleans()),
    }
    return set_fields(imagegen_pb2.PreviewOptions(), draw(fields(choices)))


def lora_weights(tame: bool) -> st.SearchStrategy[imagegen_pb2.LoraWeight]:
    if tame:
        names, weights = st.just("ink"), maybe(tame_floats(-4.0, 4.0))
    else:
        names = st.one_of(st.sampled_from(LORA_NAMES), st.sampled_from(LORA_NAMES), short_texts())
        weights = maybe(floats())
    return st.builds(
        lambda name, weight: set_fields(imagegen_pb2.LoraWeight(name=name), {"weight": weight}),
        names,
        weights,
    )


def strengths() -> tuple[st.SearchStrategy, st.SearchStrategy]:
    """Tame strengths leave at least one of 2 steps to run."""
    return st.sampled_from([0.0, 0.5, 0.75, 1.0]), floats()


@st.composite
def generate_requests(draw, task: str | None = None) -> Case:
    """A GenerateRequest for ``task`` (any task, or none, when None)."""
    if task is None:
        task = draw(st.sampled_from(["text_to_image", "image_to_image", "inpaint", "none"]))
    choices = {
        "prompt": (st.one_of(st.just("a red fox"), tame_texts()), texts()),
        "negative_prompt": (maybe(tame_texts()), maybe(texts())),
        "width": (st.sampled_from([0, 64, 72, 128]), sizes()),
        "height": (st.sampled_from([0, 64, 72, 128]), sizes()),
        # Image tasks run steps x strength of them: keep one at least.
        "steps": (
            st.integers(1 if task in ("text_to_image", "none") else 2, 3),
            uint32s(1, 2, 3, 0, 150, 151),
        ),
        "guidance_scale": (maybe(tame_floats(0.0, 15.0)), maybe(floats())),
        "seed": (
            maybe(st.integers(0, U64_MAX - 8)),
            maybe(st.sampled_from([0, 7, 2**63, U64_MAX - 8, U64_MAX - 1, U64_MAX])),
        ),
        "num_images": (st.sampled_from([0, 1, 2]), uint32s(0, 1, 2, 8, 9)),
        "output_format": (st.integers(0, 3), enums(0, 1, 2, 3)),
        "previews": (preview_options(), preview_options()),
        "scheduler": (
            st.sampled_from(["", *SCHEDULERS]),
            st.one_of(st.sampled_from(ODD_SCHEDULERS), short_texts()),
        ),
        "output_quality": (st.integers(0, 100), uint32s(0, 1, 50, 95, 100, 101)),
        "omit_parameters": (st.booleans(), st.booleans()),
        "loras": (
            st.lists(lora_weights(tame=True), max_size=1),
            st.lists(lora_weights(tame=False), max_size=3),
        ),
    }
    paths = []
    if task == "image_to_image":
        paths = ["image_to_image.init_image"]
        choices[paths[0]] = image_fields()
        choices["image_to_image.strength"] = strengths()
        # Without an IP-Adapter in the model set a style image is refused.
        style = st.one_of(st.none(), st.none(), st.none(), images())
        choices["image_to_image.style_image"] = (st.none(), style)
        choices["image_to_image.style_scale"] = (tame_floats(0.0, 2.0), floats())
        paths.append("image_to_image.style_image")
    elif task == "inpaint":
        paths = ["inpaint.image", "inpaint.mask"]
        for path in paths:
            choices[path] = image_fields()
        choices["inpaint.strength"] = strengths()
    values = draw(fields(choices))
    found = _images_of(values, paths)
    loras = values.pop("loras")
    nested = {name: values.pop(name) for name in list(values) if "." in name}
    request = set_fields(imagegen_pb2.GenerateRequest(), values)
    request.loras.extend(loras)
    if task in ("text_to_image", "image_to_image", "inpaint"):
        getattr(request, task).SetInParent()
    for path, value in nested.items():
        part, name = path.split(".")
        set_fields(getattr(request, part), {name: value})
    _keep_cheap(request, found)
    return Case(request, found)


def _keep_cheap(request: imagegen_pb2.GenerateRequest, found: dict[str, FuzzImage]) -> None:
    """Scale a request down that, if accepted, would cost more than
    :data:`GENERATION_BUDGET`. Out-of-range values stay: they never run."""
    task = request.WhichOneof("task")
    source = {"image_to_image": "image_to_image.init_image", "inpaint": "inpaint.image"}.get(task)
    image = found.get(source) if source else None
    native = image.size if image is not None and image.size else (64, 64)
    width = request.width or max(64, native[0] // 8 * 8)
    height = request.height or max(64, native[1] // 8 * 8)
    steps = request.steps or 30
    images = request.num_images or 1
    if width * height * steps * images <= GENERATION_BUDGET:
        return
    if 1 <= request.num_images <= LIMITS.max_images_per_request:
        request.num_images = 1
    if request.steps <= LIMITS.max_steps:
        request.steps = min(request.steps, 2) or 2
    if width * height > 512 * 512:
        # Keep the odd side when it is out of range: it never runs then.
        if request.width in range(64, LIMITS.max_image_side + 1, 8):
            request.width = 64
        if request.height in range(64, LIMITS.max_image_side + 1, 8):
            request.height = 64


# -------------------------------------------------------------- alignment


@st.composite
def image_lists(draw, tame: bool) -> list[FuzzImage]:
    """1..4 valid images when tame; else 0..4 of any kind, the limit, one
    more, or many repeats of a few."""
    if tame:
        return draw(st.lists(valid_images(max_side=48), min_size=1, max_size=4))
    count = draw(
        st.one_of(
            st.integers(0, 4),
            st.sampled_from([LIMITS.max_align_images, LIMITS.max_align_images + 1, 100]),
        )
    )
    distinct = [draw(images()) for _ in range(min(count, 4))]
    return [distinct[i % len(distinct)] for i in range(count)] if distinct else []


@st.composite
def text_lists(draw, tame: bool) -> list[str]:
    """1..5 short texts when tame; else 0..5 of any kind, the limit, one
    more, or many repeats of a few."""
    if tame:
        return draw(st.lists(tame_texts(), min_size=1, max_size=5))
    count = draw(
        st.one_of(
            st.integers(0, 5),
            st.sampled_from([32, LIMITS.max_align_texts, LIMITS.max_align_texts + 1, 1000]),
        )
    )
    some = st.one_of(st.sampled_from(["a fox", "", " ", "\x00", "a cat " * 40]), texts())
    distinct = [draw(some) for _ in range(min(count, 5))]
    return [distinct[i % len(distinct)] for i in range(count)] if distinct else []


def _image_paths(images: list[FuzzImage]) -> dict[str, FuzzImage]:
    return {f"images[{i}]": image for i, image in enumerate(images)}


def _lists(maker) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    return maker(tame=True), maker(tame=False)


@st.composite
def embed_images_requests(draw) -> Case:
    chosen = draw(fields({"images": _lists(image_lists)}))["images"]
    request = align_pb2.EmbedImagesRequest(images=[image.proto() for image in chosen])
    return Case(request, _image_paths(chosen))


@st.composite
def embed_texts_requests(draw) -> Case:
    chosen = draw(fields({"texts": _lists(text_lists)}))["texts"]
    return Case(align_pb2.EmbedTextsRequest(texts=chosen))


@st.composite
def match_requests(draw) -> Case:
    values = draw(
        fields(
            {
                "images": _lists(image_lists),
                "texts": _lists(text_lists),
                "image_text_matching": (st.booleans(), st.booleans()),
            }
        )
    )
    chosen = values["images"]
    request = align_pb2.MatchRequest(
        images=[image.proto() for image in chosen],
        texts=values["texts"],
        image_text_matching=values["image_text_matching"],
    )
    return Case(request, _image_paths(chosen))
