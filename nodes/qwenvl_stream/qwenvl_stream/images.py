"""Images named by a request: http(s) URLs, ``data:`` URIs and raw base64.

Every failure is an ``ImageError`` whose message the client sees (the
request ends with ``finish_reason: error``); nothing here may take the node
down. Sizes are checked before decoding: the encoded bytes against
``max_bytes`` and the pixel count against ``max_pixels`` (PIL reads the
size from the header without decoding, which stops decompression bombs).
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

_USER_AGENT = "qwenvl-stream (dora-rs node)"


class ImageError(ValueError):
    """An image that cannot be fetched, decoded or accepted; the message is meant for the client."""


@dataclass(frozen=True, slots=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    timeout_s: float


def describe(source: str, limit: int = 60) -> str:
    """A short, log-safe name for an image source (data URIs can be megabytes)."""
    source = source.strip()
    return source if len(source) <= limit else source[:limit] + "…"


def load_image(source: str, limits: ImageLimits) -> Image.Image:
    """Fetch or decode one image and return it as RGB."""
    source = source.strip()
    if not source:
        raise ImageError("empty image reference")
    scheme = source.split(":", 1)[0].lower() if ":" in source[:10] else ""
    if scheme in ("http", "https"):
        data = _fetch(source, limits)
    elif scheme == "data":
        data = _decode_data_uri(source, limits.max_bytes)
    elif scheme:
        raise ImageError(f"unsupported image URL scheme {scheme!r}: use http(s), a data: URI or base64")
    else:
        data = _decode_base64(source, limits.max_bytes)
    return _open(data, limits.max_pixels, describe(source))


def _fetch(url: str, limits: ImageLimits) -> bytes:
    name = describe(url)
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT, "Accept": "image/*"})
    try:
        with urllib.request.urlopen(request, timeout=limits.timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > limits.max_bytes:
                raise ImageError(f"image {name} is {int(length)} bytes, more than the {limits.max_bytes} allowed")
            data: bytes = response.read(limits.max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise ImageError(f"could not fetch image {name}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise ImageError(f"could not fetch image {name}: {exc.reason}") from exc
    except (TimeoutError, OSError, ValueError) as exc:
        raise ImageError(f"could not fetch image {name}: {exc}") from exc
    if len(data) > limits.max_bytes:
        raise ImageError(f"image {name} is larger than the {limits.max_bytes} bytes allowed")
    return data


def _decode_data_uri(uri: str, max_bytes: int) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise ImageError("malformed data: URI (no comma)")
    media_type = header[len("data:") :].split(";", 1)[0].strip().lower()
    if media_type and not media_type.startswith("image/"):
        raise ImageError(f"data: URI has media type {media_type!r}, not an image")
    if header.lower().endswith(";base64"):
        return _decode_base64(payload, max_bytes)
    data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise ImageError(f"image is larger than the {max_bytes} bytes allowed")
    return data


def _decode_base64(text: str, max_bytes: int) -> bytes:
    compact = "".join(text.split())
    if len(compact) // 4 * 3 > max_bytes + 3:
        raise ImageError(f"image is larger than the {max_bytes} bytes allowed")
    try:
        data = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError("image is neither an http(s) URL, a data: URI nor valid base64") from exc
    if len(data) > max_bytes:
        raise ImageError(f"image is larger than the {max_bytes} bytes allowed")
    return data


def _open(data: bytes, max_pixels: int, name: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"image {name} is {width}x{height} pixels, more than the {max_pixels} allowed")
        image.load()
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError(f"could not decode image {name}: not a known image format") from exc
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"could not decode image {name}: {exc}") from exc
    if width < 1 or height < 1:
        raise ImageError(f"image {name} is empty")
    return image.convert("RGB")
