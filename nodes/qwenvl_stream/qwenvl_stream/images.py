"""Images named by a request: http(s) URLs, ``data:`` URIs and raw base64.

Every failure is an ``ImageError`` whose message the client sees (the
request ends with ``finish_reason: error``); nothing here may take the node
down. URLs are fetched by ``fetch.UrlFetcher`` (addresses inside the node's
network refused, redirects re-checked, one deadline for the whole fetch);
its failures reach the client only as ``URL_NOT_ALLOWED`` or
``FETCH_FAILED``, never with the remote server's words, and are logged
here. Sizes are checked before decoding: the encoded bytes against
``max_bytes`` and the pixel count against ``max_pixels`` (PIL reads the
size from the header without decoding, which stops decompression bombs).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import urllib.parse
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from .fetch import FetchFailed, NotAllowed, TooLarge, UrlFetcher
from .settings import Settings

logger = logging.getLogger(__name__)

URL_NOT_ALLOWED = "image URL not allowed"
FETCH_FAILED = "image fetch failed"


class ImageError(ValueError):
    """An image that cannot be fetched, decoded or accepted; the message is meant for the client."""


@dataclass(frozen=True, slots=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    timeout_s: float
    """Bounds the whole fetch of one URL, redirects included."""


@dataclass(frozen=True, slots=True)
class ImageLoader:
    """``load_image`` with the node's limits and URL policy: what the scheduler's prefetch calls."""

    limits: ImageLimits
    fetcher: UrlFetcher = field(default_factory=UrlFetcher)

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLoader:
        limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels, settings.image_timeout_s)
        return cls(limits, UrlFetcher(allow_private=settings.allow_private_urls))

    def __call__(self, source: str) -> Image.Image:
        return load_image(source, self.limits, self.fetcher)


def describe(source: str, limit: int = 60) -> str:
    """A short name for an image source (data URIs can be megabytes); log it with ``%r``."""
    source = source.strip()
    return source if len(source) <= limit else source[:limit] + "…"


def load_image(source: str, limits: ImageLimits, fetcher: UrlFetcher | None = None) -> Image.Image:
    """Fetch or decode one image and return it as RGB; ``fetcher`` defaults to the strict policy."""
    source = source.strip()
    if not source:
        raise ImageError("empty image reference")
    scheme = source.split(":", 1)[0].lower() if ":" in source[:10] else ""
    if scheme in ("http", "https"):
        data = _fetch(source, limits, fetcher or UrlFetcher())
    elif scheme == "data":
        data = _decode_data_uri(source, limits.max_bytes)
    elif scheme:
        logger.warning("image URL %r refused: scheme %r", describe(source), scheme)
        raise ImageError(URL_NOT_ALLOWED)
    else:
        data = _decode_base64(source, limits.max_bytes)
    return _open(data, limits.max_pixels, describe(source))


def _fetch(url: str, limits: ImageLimits, fetcher: UrlFetcher) -> bytes:
    try:
        return fetcher.get(url, max_bytes=limits.max_bytes, timeout_s=limits.timeout_s)
    except NotAllowed as exc:
        logger.warning("image URL %r refused: %r", describe(url, 200), str(exc))
        raise ImageError(URL_NOT_ALLOWED) from None
    except TooLarge as exc:
        logger.warning("image URL %r too large: %r", describe(url, 200), str(exc))
        raise ImageError(f"image is larger than the {limits.max_bytes} bytes allowed") from None
    except FetchFailed as exc:
        logger.warning("image URL %r could not be fetched: %r", describe(url, 200), str(exc))
        raise ImageError(FETCH_FAILED) from None


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
