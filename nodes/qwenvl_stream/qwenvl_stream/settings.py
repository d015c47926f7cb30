"""The node's settings, read once from the environment in ``main()``.

No other module reads ``os.environ``; tests construct ``Settings(...)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"


@dataclass(frozen=True, slots=True)
class Settings:
    model_name_or_path: str = DEFAULT_MODEL
    """A hub id or a local directory with the weights, processor config and chat template."""
    device: str = "auto"
    """``auto`` (CUDA, else MPS, else CPU), or a torch device such as ``cuda:1`` or ``cpu``."""
    default_max_tokens: int = 1024
    """New tokens when a request names no ``max_tokens``."""
    max_tokens_limit: int = 8192
    """Upper bound on any request's ``max_tokens`` (larger values are clamped; the answer then ends with ``length``)."""
    max_queued_requests: int = 16
    """Requests waiting for a place in the batch; beyond it a request ends at once with an error chunk."""
    max_batch: int = 8
    """Requests generating at once (one batch row each). 1 is the one-at-a-time path: one ``generate()``
    per request, no continuous batching."""
    continuous_batching: bool = True
    """Text-only requests join transformers' continuous batching; off, every request goes through
    micro-batched ``generate()`` (requests with images always do)."""
    max_image_bytes: int = 20 * 1024 * 1024
    """Largest encoded image accepted (URL body or decoded base64)."""
    max_image_pixels: int = 64 * 1024 * 1024
    """Largest decoded image (width × height) accepted, against decompression bombs."""
    max_images_per_request: int = 16
    """Most images one request may name; more end the request with an error before any is fetched."""
    max_total_image_pixels: int = 256 * 1024 * 1024
    """Most decoded pixels (width × height, summed) of one request's images: 4 × the default
    ``max_image_pixels``, ~768 MiB as RGB. Checked from each image's header before any is decoded:
    a 1-bit PNG of 8192 × 8192 is 8 KB on the wire but 200 MB once decoded."""
    vision_max_pixels: int | None = None
    """Qwen's ``max_pixels``: larger images are scaled down to this many pixels before the vision
    encoder (28 × 28 pixels per visual token). Unset: the checkpoint's own setting."""
    image_timeout_s: float = 10.0
    """Time limit for fetching one http(s) image: the whole fetch, redirects included."""
    allow_private_urls: bool = False
    """Fetch image URLs whose host resolves to a loopback, private, link-local or other non-public
    address (refused by default: a client must not reach the node's own network)."""
    streamer_timeout_s: float = 300.0
    """Longest wait for the next step's output (prefill included) while requests generate; past it
    they fail with an error chunk."""
    heartbeat_s: float = 0.25
    """Seconds between the heartbeats the node sends while it holds requests (docs/architecture.md, "Hello and
    heartbeat"): a replica that holds requests and goes silent is treated as dead by the server."""
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
                raise ValueError(f"{_env_name(f.name)} must be > 0, got {value!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Read ``MODEL_NAME_OR_PATH`` and ``QWENVL_*``; a bad value raises ``ValueError`` naming the variable."""
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            name = _env_name(f.name)
            raw = environ.get(name)
            if raw is None or not raw.strip():
                continue
            cast = {"int": int, "int | None": int, "float": float, "bool": _as_bool}.get(str(f.type), str)
            try:
                values[f.name] = cast(raw.strip())
            except ValueError:
                raise ValueError(f"{name}: cannot read {raw!r} as {f.type}") from None
        return cls(**values)  # type: ignore[arg-type]


def _as_bool(raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _env_name(field: str) -> str:
    return "MODEL_NAME_OR_PATH" if field == "model_name_or_path" else "QWENVL_" + field.upper()
