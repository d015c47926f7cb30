"""Loading Qwen2.5-VL and its processor: device, dtype, attention, and an image-only fallback.

CUDA gets bfloat16 (float16 where bf16 is unsupported) and flash-attention
when ``flash_attn`` is installed; MPS gets float16; the CPU float32.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

from .settings import Settings

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model or processor could not be loaded; the message says why, for the operator."""


@dataclass(frozen=True, slots=True)
class Placement:
    device: torch.device
    dtype: torch.dtype
    attn_implementation: str | None


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model: Any
    processor: Any
    placement: Placement
    eos_token_ids: frozenset[int]


def choose_placement(requested: str = "auto") -> Placement:
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            requested = "mps"
        else:
            requested = "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        attn = "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else None
        return Placement(device, dtype, attn)
    if device.type == "mps":
        return Placement(device, torch.float16, None)
    return Placement(device, torch.float32, None)


class ImageOnlyProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor without its video processor.

    In transformers 5, ``AutoProcessor`` also builds a video processor, which
    needs torchvision; where torchvision is missing or does not import (no
    CPU build of it matches torch 2.13.0, for instance) images still work
    through this class. Only the constructor differs: it takes no
    ``video_processor``, so ``from_pretrained`` loads just the image
    processor, the tokenizer and the chat template.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any) -> None:
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)  # type: ignore[no-untyped-call]


def load_processor(name_or_path: str) -> Any:
    try:
        return AutoProcessor.from_pretrained(name_or_path)  # type: ignore[no-untyped-call]
    except ImportError as exc:
        reason = _first_line(exc).split(". ")[0]
        logger.warning("full processor unavailable (%s); using the image-only processor: images work, video does not", reason)
    return ImageOnlyProcessor.from_pretrained(name_or_path)


def cap_vision_pixels(image_processor: Any, max_pixels: int) -> None:
    """Scale larger images down to ``max_pixels`` before the vision encoder (fewer visual tokens, less memory)."""
    size = {**dict(image_processor.size), "longest_edge": max_pixels}
    try:
        image_processor.size = type(image_processor.size)(**size)
    except TypeError:
        image_processor.size = size


def load_model(settings: Settings) -> LoadedModel:
    """Load processor and weights, logging progress and timing; raises ``ModelLoadError``."""
    name = os.path.expanduser(settings.model_name_or_path)
    if name.startswith(("/", "./", "../")) and not os.path.isdir(name):
        raise ModelLoadError(f"could not load {name!r}: no such directory (MODEL_NAME_OR_PATH)")
    started = time.monotonic()
    try:
        placement = choose_placement(settings.device)
        logger.info("loading processor for %s", name)
        processor = load_processor(name)
        if settings.vision_max_pixels is not None:
            cap_vision_pixels(processor.image_processor, settings.vision_max_pixels)
        logger.info(
            "processor ready in %.1f s; loading weights on %s as %s (attention: %s)",
            time.monotonic() - started,
            placement.device,
            str(placement.dtype).removeprefix("torch."),
            placement.attn_implementation or "default",
        )
        loaded_at = time.monotonic()
        extra: dict[str, Any] = {}
        if placement.attn_implementation:
            extra["attn_implementation"] = placement.attn_implementation
        # device_map puts the weights straight on the GPU but needs accelerate (the gpu extra).
        direct = placement.device.type != "cpu" and importlib.util.find_spec("accelerate") is not None
        if direct:
            extra["device_map"] = str(placement.device)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(name, dtype=placement.dtype, **extra)
        if not direct:
            model = model.to(placement.device)  # type: ignore[arg-type]
        model.eval()  # type: ignore[no-untyped-call]
    except Exception as exc:  # every failure becomes one message for the operator
        raise ModelLoadError(f"could not load {name!r}: {explain_load_error(exc)}") from exc
    parameters = sum(p.numel() for p in model.parameters())
    logger.info(
        "model ready in %.1f s (weights %.1f s, %.1f M parameters on %s)",
        time.monotonic() - started,
        time.monotonic() - loaded_at,
        parameters / 1e6,
        placement.device,
    )
    return LoadedModel(model, processor, placement, _eos_ids(model, processor))


def _eos_ids(model: Any, processor: Any) -> frozenset[int]:
    ids: set[int] = set()
    for value in (model.generation_config.eos_token_id, processor.tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def explain_load_error(exc: BaseException) -> str:
    """Name the likely cause (missing weights, no network, out of memory, missing package) before the detail."""
    text = f"{type(exc).__name__}: {_first_line(exc)}"
    lowered = str(exc).lower()
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in lowered:
        return f"out of memory (try a smaller model, QWENVL_DEVICE, or free the GPU) - {text}"
    if isinstance(exc, ImportError):
        return f"a required package is missing - {text}"
    if any(s in lowered for s in ("offline", "connect", "resolve", "network", "timed out", "max retries")):
        return (
            f"no network to download it (set MODEL_NAME_OR_PATH to a local copy, or download it first "
            f"with `hf download`) - {text}"
        )
    if isinstance(exc, OSError) or any(s in lowered for s in ("does not appear to have", "no such file", "not found")):
        return f"weights or config files are missing (check MODEL_NAME_OR_PATH) - {text}"
    return text


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
