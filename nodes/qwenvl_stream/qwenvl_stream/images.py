"""Images named by a request: http(s) URLs, ``data:`` URIs and raw base64.

Every failure is an ``ImageError`` whose message the client sees (the
request ends with ``finish_reason: error``); nothing here may take the node
down. URLs are fetched by ``fetch.UrlFetcher`` (addresses inside the node's
network refused, redirects re-checked, one deadline for the whole fetch);
its failures reach the client only as ``URL_NOT_ALLOWED`` or
``FETCH_FAILED``, never with the remote server's words, and are logged
here. A decoder's failure reaches the client as a fixed text too (its own
words go to the log, escaped).

Limits, all checked before anything is decoded (PIL's ``Image.open`` reads
the header only; ``load`` decodes): the number of images in a request,
each image's encoded bytes (``max_bytes``), each image's pixels
(``max_pixels``) and the pixels of all the request's images together
(``max_total_pixels``), which stops decompression bombs one at a time and
many at once. Only ``ALLOWED_FORMATS`` are opened.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from .fetch import FetchFailed, NotAllowed, TooLarge, UrlFetcher
from .settings import Settings

logger = logging.getLogger(__name__)

URL_NOT_ALLOWED = "image URL not allowed"
FETCH_FAILED = "image fetch failed"
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
"""The only decoders tried. Without ``formats=`` PIL tries every plugin it has, EPS included,
which hands the data to Ghostscript where that is installed."""
_FORMATS_TEXT = "PNG, JPEG, WebP, GIF or BMP"


class ImageError(ValueError):
    """An image that cannot be fetched, decoded or accepted; the message is meant for the client."""


@dataclass(frozen=True, slots=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    timeout_s: float
    """Bounds the whole fetch of one URL, redirects included."""
    max_images: int | None = None
    """Images one request may name (``None``: no limit)."""
    max_total_pixels: int | None = None
    """Pixels of all of one request's images together (``None``: no limit beyond ``max_pixels`` each)."""


@dataclass(frozen=True, slots=True)
class ImageLoader:
    """``load_images`` with the node's limits and URL policy: what the scheduler's prefetch calls."""

    limits: ImageLimits
    fetcher: UrlFetcher = field(default_factory=UrlFetcher)

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLoader:
        limits = ImageLimits(
            settings.max_image_bytes,
            settings.max_image_pixels,
            settings.image_timeout_s,
            max_images=settings.max_images_per_request,
            max_total_pixels=settings.max_total_image_pixels,
        )
        return cls(limits, UrlFetcher(allow_private=settings.allow_private_urls))

    def __call__(self, sources: Sequence[str], halt: threading.Event | None = None) -> list[Image.Image]:
        return load_images(sources, self.limits, self.fetcher, halt)


def describe(source: str, limit: int = 60) -> str:
    """A short name for an image source (data URIs can be megabytes); log it with ``%r``, never ``%s``."""
    source = source.strip()
    return source if len(source) <= limit else source[:limit] + "…"


def check_image_count(count: int, max_images: int | None) -> None:
    """Refuse a request that names more than ``max_images`` images, before any is fetched."""
    if max_images is not None and count > max_images:
        raise ImageError(f"too many images: {count} in one request, at most {max_images} allowed (QWENVL_MAX_IMAGES_PER_REQUEST)")


def load_images(
    sources: Sequence[str], limits: ImageLimits, fetcher: UrlFetcher | None = None, halt: threading.Event | None = None
) -> list[Image.Image]:
    """One request's images as RGB, in order; ``[]`` once ``halt`` is set (a cancel).

    Every image is fetched and its header read first; only when the count,
    each image's pixels and their sum are within the limits is any decoded.
    """
    if isinstance(sources, str):  # a str is a Sequence[str] too, of one-character sources
        raise TypeError("load_images takes a list of image sources")
    check_image_count(len(sources), limits.max_images)
    opened: list[tuple[Image.Image, str, str]] = []
    total = 0
    for index, source in enumerate(sources, 1):
        if halt is not None and halt.is_set():
            return []
        label = f"image {index}"
        image = open_image(source, limits, fetcher, label=label)
        total += image.width * image.height
        if limits.max_total_pixels is not None and total > limits.max_total_pixels:
            raise ImageError(
                f"the request's images have more than the {limits.max_total_pixels} pixels allowed in all "
                f"(QWENVL_MAX_TOTAL_IMAGE_PIXELS): {label} passes it"
            )
        opened.append((image, label, source))
    decoded: list[Image.Image] = []
    while opened:
        if halt is not None and halt.is_set():
            return []
        image, label, source = opened.pop(0)  # its encoded bytes go as soon as it is decoded
        decoded.append(_decode(image, label, source))
    return decoded


def load_image(source: str, limits: ImageLimits, fetcher: UrlFetcher | None = None) -> Image.Image:
    """Fetch or decode one image and return it as RGB; ``fetcher`` defaults to the strict policy."""
    return _decode(open_image(source, limits, fetcher), "image", source)


def open_image(source: str, limits: ImageLimits, fetcher: UrlFetcher | None = None, *, label: str = "image") -> Image.Image:
    """Fetch or decode the bytes of one image and read its header: nothing is decoded yet.

    Checks the encoded size, the format (``ALLOWED_FORMATS``) and the pixel count.
    """
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
    return _open(data, limits.max_pixels, label, source)


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


def _open(data: bytes, max_pixels: int, label: str, source: str) -> Image.Image:
    """The image with only its header read: allowed format, at least one pixel, at most ``max_pixels``."""
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError as exc:
        raise ImageError(f"could not decode {label}: not a known image format ({_FORMATS_TEXT})") from exc
    except Image.DecompressionBombError as exc:  # PIL's own bound, above ours unless ours was raised past it
        raise ImageError(f"{label} has more than the {max_pixels} pixels allowed (QWENVL_MAX_IMAGE_PIXELS)") from exc
    except Exception as exc:  # a decoder reading a hostile header: whatever it raises, the image is at fault
        raise _undecodable(label, source, exc) from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"{label} is empty")
    if width * height > max_pixels:
        raise ImageError(f"{label} is {width}x{height} pixels, more than the {max_pixels} allowed (QWENVL_MAX_IMAGE_PIXELS)")
    return image


def _decode(image: Image.Image, label: str, source: str) -> Image.Image:
    try:
        image.load()
        return image.convert("RGB")
    except Exception as exc:  # as in ``_open``: the decoder's words stay in the log
        raise _undecodable(label, source, exc) from exc


def _undecodable(label: str, source: str, exc: Exception) -> ImageError:
    logger.warning("%s (%r) could not be decoded: %r", label, describe(source), exc)
    return ImageError(f"could not decode {label}: the data is damaged or incomplete")
