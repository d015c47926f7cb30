"""One Qwen2.5-VL generation with transformers, streamed piece by piece.

``generate`` runs in the scheduler's worker thread, with the request's
images already fetched and decoded (``prefetch.py``). It starts
``model.generate`` in a second thread and reads its ``TextIteratorStreamer``
here, because the streamer is an iterator fed from inside ``generate``.
Two things in that pairing must be handled (both seen on this machine): the
streamer yields empty pieces (skipped), and it blocks forever when
``generate`` raises, unless it has a timeout and the error is carried back
(the thread ends the streamer and stores the exception).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer, set_seed

from openai_stream_protocol import parse_request_texts

from .chat import Chat, to_chat
from .generation import GenerationParams, Outcome, RequestError, sampling_kwargs
from .model import LoadedModel
from .settings import Settings

logger = logging.getLogger(__name__)


class HaltCriteria(StoppingCriteria):
    """Stops ``generate`` at the next token once ``halt`` is set (cancel, stop string, timeout)."""

    def __init__(self, halt: threading.Event) -> None:
        self.halt = halt

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.halt.is_set(), dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class QwenEngine:
    def __init__(self, loaded: LoadedModel, settings: Settings) -> None:
        self.loaded = loaded
        self.settings = settings

    def generate(
        self,
        texts: list[str],
        params: GenerationParams,
        emit: Callable[[str], None],
        halt: threading.Event,
        *,
        images: Sequence[Any] = (),
    ) -> Outcome:
        chat = to_chat(parse_request_texts(texts))
        if not chat.messages:
            raise RequestError("the request has no messages")
        if len(images) != len(chat.image_sources):
            raise RuntimeError(f"{len(chat.image_sources)} image(s) in the prompt but {len(images)} loaded")
        inputs = self._prepare(chat, list(images))
        prompt_tokens = int(inputs["input_ids"].shape[-1])
        if halt.is_set():
            return Outcome("stop", prompt_tokens, 0)
        if params.seed is not None:
            set_seed(params.seed)
        sequences = self._stream(inputs, params, emit, halt)
        generated = sequences[0, prompt_tokens:].tolist()
        at_limit = len(generated) >= params.max_tokens and not (generated and generated[-1] in self.loaded.eos_token_ids)
        finish_reason = "length" if at_limit and not halt.is_set() else "stop"
        return Outcome(finish_reason, prompt_tokens, len(generated))

    def _prepare(self, chat: Chat, images: list[Any]) -> Any:
        processor = self.loaded.processor
        try:
            prompt = processor.apply_chat_template(chat.messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja2 errors, raise_exception() in templates
            raise RequestError(f"the model's chat template rejected the conversation: {exc}") from exc
        try:
            inputs = processor(text=[prompt], images=images or None, return_tensors="pt")
        except (ValueError, TypeError) as exc:  # e.g. an image of extreme aspect ratio
            raise RequestError(f"could not prepare the input: {exc}") from exc
        return inputs.to(self.loaded.placement.device)

    def _stream(self, inputs: Any, params: GenerationParams, emit: Callable[[str], None], halt: threading.Event) -> Any:
        tokenizer = self.loaded.processor.tokenizer
        timeout_s = self.settings.streamer_timeout_s
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout_s)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                with torch.inference_mode():
                    result["sequences"] = self.loaded.model.generate(
                        **inputs,
                        streamer=streamer,
                        max_new_tokens=params.max_tokens,
                        stopping_criteria=StoppingCriteriaList([HaltCriteria(halt)]),
                        **sampling_kwargs(params),
                    )
            except BaseException as exc:  # carried back to the reading thread
                result["error"] = exc
                streamer.end()  # type: ignore[no-untyped-call]

        thread = threading.Thread(target=run, name="qwenvl-generate", daemon=True)
        thread.start()
        try:
            for piece in streamer:
                if piece:
                    emit(piece)
        except queue.Empty:
            halt.set()
            thread.join(timeout_s)
            raise RuntimeError(f"no output from the model for {timeout_s:g} s (QWENVL_STREAMER_TIMEOUT_S)") from None
        thread.join(timeout_s)
        if "error" in result:
            error = result["error"]
            if isinstance(error, torch.OutOfMemoryError):
                raise RuntimeError(
                    "out of memory while generating; try a shorter prompt, smaller images or fewer max_tokens"
                ) from error
            raise RuntimeError(f"{type(error).__name__}: {error}") from error
        if "sequences" not in result:
            raise RuntimeError(f"generation did not finish within {timeout_s:g} s after its last output")
        return result["sequences"]
