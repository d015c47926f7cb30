"""Qwen2.5-VL generation for many requests at once, with transformers, step by step.

Two schemes share the model (docs/architecture.md, "Dora wire protocol",
batch form):

- **Continuous batching** (transformers' ``init_continuous_batching``) for
  text-only requests with the model's own sampling: a request joins the
  running batch at the next step and leaves it the step it ends, and a
  cancel frees its row. The manager takes token lists only (no
  ``pixel_values``), so it never sees an image.
- **Micro-batched ``generate()``** for the rest (images, a temperature,
  top_p or seed of their own): the waiting requests of one sampling setup
  are left-padded into one batch; ``_RowStreamer`` routes each step's
  ``(B,)`` tokens to their rows and ``RowCriteria`` masks a row (cancel,
  stop string, its own ``max_tokens``) so that ``generate`` pads it from
  the next step on. New requests wait for the next batch.

Only one thread may run the model at a time: Qwen2.5-VL keeps
``rope_deltas`` on the model object between the steps of a ``generate``.
The manager's loop runs in its own thread; a ``generate`` batch runs in the
scheduler's engine thread inside ``manager.pause()``, which parks that loop
at a step boundary (its requests keep their cache and resume after).

Checked with transformers 5.24 on CPU (tiny random models): continuous
batching with ``sdpa`` gives the same greedy tokens as ``generate`` alone,
and so does left-padded ``generate``; ``paged|eager`` did not.

A continued request (docs/architecture.md, "Continuation") is prepared as the
prompt the chat template renders with the delivered text as the start of the
assistant turn (``continue_final_message``), tokenized in two parts: the prompt
before that text exactly as a fresh request's, then each delivered piece on its
own. A piece is one decode step's text, so this gives back the tokens the first
replica generated where a tokenizer of the whole text might merge across them;
greedy decoding then goes on with the very tokens the uninterrupted answer had.
Either scheme serves it, the seed is the request's.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, set_seed
from transformers.generation.streamers import BaseStreamer

from openai_stream_protocol import Continuation, parse_request_texts

from .chat import Message, delivered_pieces, template_knows_tools, to_chat
from .generation import BatchRow, GenerationParams, OnStep, RequestError, RowStream, StepRow, sampling_kwargs
from .model import LoadedModel
from .settings import Settings
from .thinking import opens_thinking, takes_enable_thinking, template_thinks

logger = logging.getLogger(__name__)

# Continuous batching's paged cache on the CPU, where it cannot size itself from free GPU memory.
CPU_PAGE_SIZE = 32
CPU_CACHE_TOKENS_PER_ROW = 4096
CPU_MAX_BATCH_TOKENS = 512
MANAGER_READY_TIMEOUT_S = 60.0
GPU_CACHE_SHARE = 0.5


@dataclass(frozen=True, slots=True)
class Prepared:
    inputs: Any
    """The processor's output for this request alone (a batch of one)."""
    prompt_tokens: int
    """The length of ``inputs``' token row, a continued answer's delivered tokens included."""
    continued_ids: tuple[int, ...] = ()
    """A continued answer's delivered text as tokens: the end of the token row, not the client's prompt."""

    @property
    def reported_prompt_tokens(self) -> int:
        """The prompt as the client sent it (``prompt_tokens`` in the usage): without the delivered tokens."""
        return self.prompt_tokens - len(self.continued_ids)


class RowCriteria(StoppingCriteria):
    """Per-row stop for a batched ``generate``: a row ends once its stream ended or its ``halt`` is set.

    ``generate`` pads a stopped row with ``pad_token_id`` from then on (it
    needs ``eos_token_id`` set for that), and ends when every row stopped.
    """

    def __init__(self, streams: Sequence[RowStream]) -> None:
        self.streams = streams

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        done = [s.ended or s.halt.is_set() for s in self.streams]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class _RowStreamer(BaseStreamer):
    """``generate``'s streamer: the first ``put`` is the (B, L) prompt, then one (B,) tensor per step."""

    def __init__(self, streams: Sequence[RowStream], on_step: OnStep) -> None:
        self.streams = streams
        self.on_step = on_step
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        rows = [row for stream, token in zip(self.streams, value.tolist(), strict=True) if (row := stream.push(int(token)))]
        if rows:
            self.on_step(rows)

    def end(self) -> None:
        pass


class QwenEngine:
    """The transformers engine; ``start``/``close`` run in the scheduler's engine thread, ``generate_batch`` too."""

    def __init__(self, loaded: LoadedModel, settings: Settings) -> None:
        self.loaded = loaded
        self.settings = settings
        self.max_batch = settings.max_batch
        self.tokenizer = loaded.processor.tokenizer
        config = loaded.model.generation_config
        pad = config.pad_token_id if config.pad_token_id is not None else self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else min(loaded.eos_token_ids))
        # One at a time (QWENVL_MAX_BATCH=1) is the old path: generate() alone, no manager.
        self.continuous = settings.continuous_batching and settings.max_batch > 1
        self._manager: Any = None
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._cb_rows: dict[str, RowStream] = {}
        self._cb_seen: dict[str, int] = {}
        self._cb_on_step: OnStep | None = None
        self._thinking: dict[bool | None, bool | None] = {}

    # -- both schemes --------------------------------------------------------------------------

    def prepare(
        self,
        texts: list[str],
        images: Sequence[Any],
        tools: Sequence[dict[str, Any]] = (),
        continuation: Continuation | None = None,
        enable_thinking: bool | None = None,
    ) -> Prepared:
        """Chat template and processor for one request; ``RequestError`` for what the client must fix.

        ``tools`` go to a template that renders them (``tools=``); for one that
        does not (Qwen2.5-VL's), ``to_chat`` writes them into the system turn.
        ``continuation``: the answer so far, the start of the assistant turn (see the module's docstring).
        """
        processor = self.loaded.processor
        template = getattr(processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        native = template_knows_tools(template)
        chat = to_chat(parse_request_texts(texts), tools, native_tools=native)
        if not chat.messages:
            raise RequestError("the request has no messages")
        if len(images) != len(chat.image_sources):
            raise RuntimeError(f"{len(chat.image_sources)} image(s) in the prompt but {len(images)} loaded")
        template_kwargs: dict[str, Any] = {"tools": list(tools)} if tools and native else {}
        if enable_thinking is not None and takes_enable_thinking(template):
            template_kwargs["enable_thinking"] = enable_thinking
        pieces = delivered_pieces(continuation) if continuation is not None else []
        try:
            if pieces:
                prompt = self._continue_prompt(chat.messages, "".join(pieces), template_kwargs)
            else:
                prompt = self._fresh_prompt(chat.messages, template_kwargs)
        except Exception as exc:  # jinja2 errors, raise_exception() in templates
            raise RequestError(f"the model's chat template rejected the conversation: {exc}") from exc
        try:
            inputs = processor(text=[prompt], images=list(images) or None, return_tensors="pt")
        except (ValueError, TypeError) as exc:  # e.g. an image of extreme aspect ratio
            raise RequestError(f"could not prepare the input: {exc}") from exc
        if not pieces:
            return Prepared(inputs, int(inputs["input_ids"].shape[-1]))
        continued = [token for piece in pieces for token in self.tokenizer.encode(piece, add_special_tokens=False)]
        row = inputs["input_ids"]
        tail = torch.tensor([continued], dtype=row.dtype)
        inputs["input_ids"] = torch.cat([row, tail], dim=-1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tail)], dim=-1)
        if "mm_token_type_ids" in inputs:  # text tokens are type 0
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(tail)], dim=-1)
        return Prepared(inputs, int(inputs["input_ids"].shape[-1]), tuple(continued))

    def thinking(self, enable_thinking: bool | None = None) -> bool | None:
        """Whether the model's answers start with reasoning in ``<think>`` tags (docs/architecture.md, "Reasoning"):
        None when the chat template never thinks (Qwen2.5-VL's), True when its generation prompt opens ``<think>``
        itself (the output then holds only ``</think>``), False when the model opens it. Found once per
        ``enable_thinking`` by rendering a one-message chat."""
        if enable_thinking in self._thinking:
            return self._thinking[enable_thinking]
        processor = self.loaded.processor
        template = getattr(processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        found: bool | None = None
        if template_thinks(template):
            passed = enable_thinking is not None and takes_enable_thinking(template)
            kwargs = {"enable_thinking": enable_thinking} if passed else {}
            try:
                prompt = self._fresh_prompt([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], kwargs)
            except Exception:  # a template that wants more than one message: read as one that thinks by itself
                prompt = ""
            found = opens_thinking(prompt)
        self._thinking[enable_thinking] = found
        return found

    def _continue_prompt(self, messages: list[Message], delivered: str, template_kwargs: dict[str, Any]) -> str:
        """The prompt up to where the delivered text starts: the template's ``continue_final_message`` rendering of
        the conversation with the delivered text as the final assistant turn, cut before that text.

        A template that cannot (or renders the text changed) gets the fresh request's prompt: for Qwen's
        templates both are the same string (``<|im_start|>assistant\n``, then the text).
        """
        processor = self.loaded.processor
        turn: Message = {"role": "assistant", "content": [{"type": "text", "text": delivered}]}
        try:
            rendered = processor.apply_chat_template(
                [*messages, turn], continue_final_message=True, add_generation_prompt=False, tokenize=False, **template_kwargs
            )
        except Exception:
            rendered = ""
        if isinstance(rendered, str) and rendered.endswith(delivered):
            return rendered[: len(rendered) - len(delivered)]
        logger.info("the chat template cannot continue an assistant turn; the delivered text follows the generation prompt")
        return self._fresh_prompt(messages, template_kwargs)

    def _fresh_prompt(self, messages: list[Message], template_kwargs: dict[str, Any]) -> str:
        """The prompt of a new answer: the conversation, then the template's generation prompt."""
        return str(
            self.loaded.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **template_kwargs)
        )

    def stream(
        self,
        request_id: str,
        params: GenerationParams,
        halt: threading.Event,
        prompt_tokens: int,
        continued_ids: Sequence[int] = (),
    ) -> RowStream:
        """One row's stream; ``prompt_tokens`` as reported, ``continued_ids`` a continued answer's delivered tokens."""
        return RowStream(request_id, params, halt, self.tokenizer, self.loaded.eos_token_ids, prompt_tokens, continued_ids)

    def start(self, on_step: OnStep) -> None:
        """Start the continuous-batching manager (engine thread, before any batch); without it every request uses ``generate``."""
        self._cb_on_step = on_step
        try:
            if self.continuous:
                self._manager = self._start_manager()
        except Exception as exc:
            logger.warning("continuous batching unavailable (%s: %s); every request uses generate()", type(exc).__name__, exc)
            self._manager = None
        finally:
            self._ready.set()

    def close(self) -> None:
        self._ready.clear()
        manager, self._manager = self._manager, None
        if manager is not None:
            manager.stop(block=True, timeout=30.0)

    # -- continuous batching (text only) -------------------------------------------------------

    def accepts_continuous(self, params: GenerationParams, has_images: bool) -> bool:
        """Text-only requests that keep the model's own sampling (the manager has one generation config)."""
        if not self.continuous or has_images or (self._ready.is_set() and self._manager is None):
            return False
        return params.temperature is None and params.top_p is None and params.seed is None

    def start_continuous(self, row: BatchRow) -> bool:
        """Add a request to the running batch (owner thread); ``False`` when the manager is not there after all."""
        if not self._ready.wait(MANAGER_READY_TIMEOUT_S):
            logger.warning("continuous batching did not start within %.0f s; using generate()", MANAGER_READY_TIMEOUT_S)
            self.continuous = False
        manager = self._manager
        if manager is None:
            return False
        prepared = self.prepare(row.texts, (), row.params.tools, row.continuation, row.params.enable_thinking)
        ids = prepared.inputs["input_ids"][0].tolist()
        stream = self.stream(row.request_id, row.params, row.halt, prepared.reported_prompt_tokens, prepared.continued_ids)
        spent = stream.spent()
        if spent is not None:  # a continuation with no token left to generate
            if self._cb_on_step is not None:
                self._cb_on_step([spent])
            return True
        with self._lock:
            self._cb_rows[row.request_id] = stream
            self._cb_seen[row.request_id] = 0
        manager.add_request(
            ids,
            request_id=row.request_id,
            max_new_tokens=stream.max_tokens,
            streaming=True,
            eos_token_id=sorted(self.loaded.eos_token_ids),
        )
        return True

    def cancel_continuous(self, request_id: str) -> None:
        """Free the request's row at the manager's next step; nothing more is reported for it."""
        with self._lock:
            known = self._cb_rows.pop(request_id, None) is not None
            self._cb_seen.pop(request_id, None)
        if known and self._manager is not None:
            self._manager.cancel_request(request_id)

    def _start_manager(self) -> Any:
        from transformers import ContinuousBatchingConfig

        model = self.loaded.model
        generation_config = copy.deepcopy(model.generation_config)
        generation_config.max_new_tokens = self.settings.max_tokens_limit
        if self.loaded.placement.device.type == "cpu":
            # No free-memory figure to size the cache from: room for max_batch rows of CPU_CACHE_TOKENS_PER_ROW.
            blocks = math.ceil(self.max_batch * CPU_CACHE_TOKENS_PER_ROW / CPU_PAGE_SIZE)
            cb_config = ContinuousBatchingConfig(
                page_size=CPU_PAGE_SIZE,
                num_blocks=blocks,
                max_batch_tokens=CPU_MAX_BATCH_TOKENS,
                max_requests_per_batch=self.max_batch,
            )
        else:
            # Its default takes 90 % of the free GPU memory for its cache; generate() batches (their own
            # cache, the vision tower's activations) need the rest.
            cb_config = ContinuousBatchingConfig(max_requests_per_batch=self.max_batch, max_memory_percent=GPU_CACHE_SHARE)
        manager = model.init_continuous_batching(generation_config=generation_config, continuous_batching_config=cb_config)
        # One call per step with every row's output: that step becomes one message. The
        # single-output path is how the manager reports a failed request.
        router = manager.output_router
        router.deliver_batch = self._on_outputs
        router.deliver = lambda output: self._on_outputs([output])
        manager.start()
        logger.info("continuous batching on for text-only requests (up to %d at once)", self.max_batch)
        return manager

    def _on_outputs(self, outputs: list[Any]) -> None:
        """The manager's thread, once per step: new tokens through each row's stream, one ``on_step`` call."""
        rows: list[StepRow] = []
        with self._lock:
            for output in outputs:
                stream = self._cb_rows.get(output.request_id)
                if stream is None:  # cancelled, or already ended
                    continue
                seen = self._cb_seen[output.request_id]
                tokens = output.generated_tokens[seen:]
                self._cb_seen[output.request_id] = seen + len(tokens)
                text = ""
                end: StepRow | None = None
                for token in tokens:
                    row = stream.push(int(token))
                    if row is not None:
                        text += row.text
                        if row.ended:
                            end = row
                            break
                if end is None and output.error:
                    stream.ended = True
                    end = StepRow(output.request_id, text, error=f"generation failed: {output.error}")
                elif end is None and output.is_finished():
                    end = stream.end()
                if end is not None:
                    rows.append(StepRow(output.request_id, text, end.outcome, end.error, stream.count))
                    del self._cb_rows[output.request_id], self._cb_seen[output.request_id]
                    if stream.halt.is_set() and not output.is_finished():  # a stop string: free the row now
                        self._manager.cancel_request(output.request_id)
                elif text:
                    rows.append(StepRow(output.request_id, text, tokens=stream.count))
        if rows and self._cb_on_step is not None:
            self._cb_on_step(rows)

    # -- micro-batched generate() --------------------------------------------------------------

    def generate_batch(self, rows: Sequence[BatchRow], on_step: OnStep) -> None:
        """One ``generate`` over ``rows`` (one sampling setup); every row gets exactly one ending ``StepRow``.

        A request whose input cannot be prepared ends at once with its error;
        the others go on. An error inside ``generate`` propagates: the
        scheduler ends the rows still open.
        """
        ready: list[tuple[BatchRow, Prepared]] = []
        failed: list[StepRow] = []
        for row in rows:
            try:
                ready.append(
                    (row, self.prepare(row.texts, row.row_images, row.params.tools, row.continuation, row.params.enable_thinking))
                )
            except RequestError as exc:
                failed.append(StepRow(row.request_id, error=str(exc)))
            except Exception as exc:
                logger.exception("request %s: preparing its input failed", row.request_id)
                failed.append(StepRow(row.request_id, error=f"could not prepare the input: {exc}"))
        streams = [
            self.stream(row.request_id, row.params, row.halt, p.reported_prompt_tokens, p.continued_ids) for row, p in ready
        ]
        spent = [end for stream in streams if (end := stream.spent()) is not None]
        if spent:  # continuations with no token left: they end now, the others generate
            ready = [(row, p) for (row, p), stream in zip(ready, streams, strict=True) if not stream.ended]
            streams = [stream for stream in streams if not stream.ended]
        if failed or spent:
            on_step(failed + spent)
        if not ready:
            return
        inputs = self._collate([p for _, p in ready])
        params = ready[0][0].params
        with self._exclusive(), torch.inference_mode():
            if params.seed is not None:
                set_seed(params.seed)
            self.loaded.model.model.rope_deltas = None
            try:
                self.loaded.model.generate(
                    **inputs,
                    streamer=_RowStreamer(streams, on_step),
                    max_new_tokens=max(stream.max_tokens for stream in streams),
                    stopping_criteria=StoppingCriteriaList([RowCriteria(streams)]),
                    eos_token_id=sorted(self.loaded.eos_token_ids),
                    pad_token_id=self.pad_token_id,
                    **sampling_kwargs(params),
                )
            except torch.OutOfMemoryError as exc:
                raise RuntimeError(
                    "out of memory while generating; try a shorter prompt, smaller images or fewer max_tokens"
                ) from exc
        tail = [end for stream in streams if (end := stream.end()) is not None]
        if tail:
            on_step(tail)

    def _collate(self, prepared: list[Prepared]) -> dict[str, torch.Tensor]:
        """Left-pad the token rows to one length; stack the image tensors in row order (what the processor does for a batch)."""
        length = max(p.prompt_tokens for p in prepared)
        out: dict[str, torch.Tensor] = {}
        for key in prepared[0].inputs:
            values = [p.inputs[key] for p in prepared if key in p.inputs]
            if key in ("input_ids", "attention_mask", "mm_token_type_ids"):
                fill = self.pad_token_id if key == "input_ids" else 0
                out[key] = torch.cat([torch.nn.functional.pad(v, (length - v.shape[-1], 0), value=fill) for v in values])
        for key in ("pixel_values", "image_grid_thw"):
            values = [p.inputs[key] for p in prepared if key in p.inputs]
            if values:
                out[key] = torch.cat(values)
        device = self.loaded.placement.device
        return {key: value.to(device) for key, value in out.items()}

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        manager = self._manager
        if manager is None or not manager.is_running():
            yield
            return
        with manager.pause():
            yield
