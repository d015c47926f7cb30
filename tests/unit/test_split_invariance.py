"""Conformance: no answer depends on where the node's output was split into chunks.

A property test (hypothesis) over the whole path from node pieces to what each client assembles. A
node output (reasoning, answer text, tool calls with JSON arguments; Unicode with multi-byte
characters, emoji and ZWJ sequences, tag-like text, arguments with ``\\uXXXX`` surrogate-pair escapes)
is split into chunks at random points (inside a tag, a JSON string, an escape, between the two halves
of an escaped surrogate pair; empty chunks too), sent in the single-chunk or the batch wire form
(``ChunkSender`` / ``BatchSender``, parsed back as the bridge parses them), delivered reordered,
duplicated and grouped at random (``FakeBackend.deliver``, into the real registry), and read by:

- the openai SDK's chat stream helper (``chat.completions.stream``, with and without streamed usage);
- raw SSE parsing of the chat stream, its bytes read in random sizes (a read may end inside a UTF-8
  character), each chunk holding one kind of delta only;
- the openai SDK's Responses stream helper (``responses.stream``);
- the anthropic SDK's stream helper (``messages.stream``).

Every one must assemble the node's output exactly: the same reasoning, text and calls, the node's
finish, and its usage wherever the API has usage. The qwen node's parsers get the same treatment
against random token boundaries in ``nodes/qwenvl_stream/tests/test_qwenvl_split_invariance.py``.
``--hypothesis-show-statistics`` prints how many split cases ran.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openai_stream_protocol import BatchSender, Chunk, ChunkSender, split_tokens
from openai_stream_protocol.testing import RecordingNode
from openai_stream_server.backend import DownstreamRequest
from openai_stream_server.settings import Settings
from tests.fakes import FakeBackend
from tests.unit.conftest import make_client

pytestmark = pytest.mark.timeout(600)

EXAMPLES = 400
"""Split cases per run (each one read by the four clients); see the module docstring for how to count them."""

# -- what the node answers ------------------------------------------------------------------

ODD = [
    "😀", "👍🏽", "👨\u200d👩\u200d👧", "é", "漢字", "\u00a0", "\n", "\t", '"', "\\",
    "<think>", "</think>", "<tool_call>", "{", "}",
]  # fmt: skip
text = st.lists(st.sampled_from(ODD) | st.text(st.characters(blacklist_categories=("Cs",)), max_size=4), max_size=8).map("".join)
scalar = st.one_of(st.integers(-(2**40), 2**40), st.booleans(), st.none(), text)
arguments = st.builds(
    lambda obj, ascii_only: json.dumps(obj, ensure_ascii=ascii_only),  # ascii: emoji become \\ud83d\\ude00 pairs
    st.dictionaries(st.sampled_from(["city", "q", "n", "😀key"]), scalar | st.lists(scalar, max_size=3), max_size=3),
    st.booleans(),
)


@dataclass(frozen=True)
class Output:
    """What the node means to answer, whole."""

    reasoning: str
    text: str
    calls: tuple[tuple[str, str, str], ...]
    """(call id, name, arguments JSON)."""

    @property
    def finish(self) -> str:
        return "tool_calls" if self.calls else "stop"

    @property
    def completion_tokens(self) -> int:
        """The node's own counts (a model counts tokens, not chunks): the same however the output is split."""
        return len(split_tokens(self.reasoning + self.text)) + sum(len(args) for _, _, args in self.calls)

    @property
    def reasoning_tokens(self) -> int:
        return len(split_tokens(self.reasoning))


outputs = st.builds(
    Output,
    text,
    text,
    st.lists(st.tuples(st.sampled_from(["get_weather", "lookup"]), arguments), max_size=2).map(
        lambda calls: tuple((f"call_{i}", name, args) for i, (name, args) in enumerate(calls))
    ),
)


def split(draw: st.DrawFn, value: str) -> list[str]:
    """``value`` cut at random code points (repeated cuts: empty pieces); an empty value may be no piece at all."""
    cuts = sorted(draw(st.lists(st.integers(0, len(value)), max_size=6)))
    edges = [0, *cuts, len(value)]
    pieces = [value[a:b] for a, b in zip(edges, edges[1:], strict=False)]
    if not value and draw(st.booleans()):
        return []
    return pieces


@dataclass
class Script:
    """One node output, split into chunks, in a wire form, delivered in some order and grouping."""

    output: Output
    reasoning: list[str]
    text: list[str]
    calls: list[list[str]]
    text_on_finish: bool
    """The last text piece rides on the finish chunk (as echo-stream sends it)."""
    batch_emits: list[int] | None
    """Batch form: emit after these message indices (None: the single-chunk form)."""
    order: list[int] = field(default_factory=list)
    duplicates: list[int] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)

    def wire(self, request_id: str) -> list[Chunk]:
        """The chunks as the server reads them off the wire, in ``seq`` order."""
        node = RecordingNode()
        meta = {"request_id": request_id}
        out = self.output
        last_text = self.text[-1] if self.text and self.text_on_finish and not self.calls else None
        texts = self.text[:-1] if last_text is not None else self.text
        steps: list[tuple[str, Any]] = [("reasoning", piece) for piece in self.reasoning]
        steps += [("text", piece) for piece in texts]
        for index, pieces in enumerate(self.calls):
            call_id, name, _ = out.calls[index]
            for i, piece in enumerate(pieces):  # the call's first chunk names it
                steps.append(("call", (index, piece, call_id if i == 0 else None, name if i == 0 else None)))
        finish = {"completion_tokens": out.completion_tokens, "reasoning_tokens": out.reasoning_tokens}
        if self.batch_emits is None:
            sender = ChunkSender(node, meta)
            for kind, value in steps:
                if kind == "reasoning":
                    sender.send_reasoning(value)
                elif kind == "text":
                    sender.send(value)
                else:
                    index, piece, call_id, name = value
                    sender.send_tool_call(index, piece, call_id=call_id, name=name)
            sender.finish(out.finish, last_text or "", **finish)
        else:
            batch = BatchSender(node)
            rid = batch.open(meta)
            for i, (kind, value) in enumerate(steps):
                if kind == "reasoning":
                    batch.send_reasoning(rid, value)
                elif kind == "text":
                    batch.send(rid, value)
                else:
                    index, piece, call_id, name = value
                    batch.send_tool_call(rid, index, piece, call_id=call_id, name=name)
                if i in self.batch_emits:
                    batch.emit()
            batch.finish(rid, out.finish, last_text or "", **finish)
            batch.emit()
        chunks = node.chunks()
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        return chunks

    def deliveries(self, chunks: list[Chunk]) -> list[list[Chunk]]:
        """The chunks reordered by ``order``, with ``duplicates`` again, cut into ``groups`` (one ``deliver`` each)."""
        n = len(chunks)
        ordered = [chunks[i % n] for i in self.order] if self.order else list(chunks)
        seen = {id(c) for c in ordered}
        ordered += [c for c in chunks if id(c) not in seen]  # every chunk at least once
        for at, which in zip(self.groups, self.duplicates, strict=False):
            ordered.insert(at % (len(ordered) + 1), chunks[which % n])
        cuts = sorted({g % (len(ordered) + 1) for g in self.groups})
        edges = [0, *cuts, len(ordered)]
        return [ordered[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]


@st.composite
def scripts(draw: st.DrawFn) -> Script:
    output = draw(outputs)
    script = Script(
        output,
        split(draw, output.reasoning),
        split(draw, output.text),
        [split(draw, args) or [""] for _, _, args in output.calls],
        draw(st.booleans()),
        draw(st.none() | st.lists(st.integers(0, 40), max_size=4)),
    )
    n = len(script.wire("probe"))
    script.order = draw(st.permutations(range(n)))
    script.duplicates = draw(st.lists(st.integers(0, n - 1), max_size=3))
    script.groups = draw(st.lists(st.integers(0, 200), max_size=6))
    return script


class ScriptedBackend(FakeBackend):
    """Answers every request with the script, delivered as it says, yielding to the loop between deliveries."""

    script: Script | None = None

    async def _answer(self, request: DownstreamRequest) -> None:
        assert self.script is not None
        for group in self.script.deliveries(self.script.wire(request.request_id)):
            await asyncio.sleep(0)
            self.deliver(group)


# -- what each client assembles ------------------------------------------------------------------


@dataclass(frozen=True)
class Assembled:
    reasoning: str
    text: str
    calls: tuple[tuple[str, str, str], ...]
    finish: str
    usage: tuple[int, int] | None
    """(completion tokens, reasoning tokens), where the client got usage."""


def expected(output: Output, usage: bool = True) -> Assembled:
    counts = (output.completion_tokens, output.reasoning_tokens) if usage else None
    return Assembled(output.reasoning, output.text, output.calls, output.finish, counts)


USER = [{"role": "user", "content": "hi"}]


async def chat_helper(client: openai.AsyncOpenAI, include_usage: bool) -> Assembled:
    async with client.chat.completions.stream(
        model="m",
        messages=USER,  # type: ignore[arg-type]
        stream_options={"include_usage": True} if include_usage else openai.omit,
    ) as stream:
        final = await stream.get_final_completion()
    choice = final.choices[0]
    extra = choice.message.model_extra or {}
    thought = extra.get("reasoning_content") or extra.get("reasoning") or ""
    calls = tuple((c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls or ())  # type: ignore[union-attr]
    usage = None
    if final.usage is not None:
        details = final.usage.completion_tokens_details
        usage = (final.usage.completion_tokens, details.reasoning_tokens if details else None)
    return Assembled(thought, choice.message.content or "", calls, str(choice.finish_reason), usage)  # type: ignore[arg-type]


def sse_data(body: bytes, reads: list[int]) -> list[str]:
    """The ``data:`` payloads of an SSE body read ``reads`` bytes at a time (cycled): lines are decoded whole."""
    out, buffer, at, i = [], b"", 0, 0
    data: list[str] = []
    while at < len(body):
        size = reads[i % len(reads)] if reads else len(body)
        buffer, at, i = buffer + body[at : at + size], at + size, i + 1
        while b"\n" in buffer:
            raw, buffer = buffer.split(b"\n", 1)
            line = raw.decode()
            if not line:
                if data:
                    out.append("\n".join(data))
                data = []
            elif line.startswith("data: "):
                data.append(line[6:])
    assert buffer == b"" and not data, "the stream ends with a complete event"
    return out


async def chat_raw(client: Any, reads: list[int], include_usage: bool) -> Assembled:
    body = {"model": "m", "messages": USER, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    response = await client.post("/v1/chat/completions", json=body)
    payloads = sse_data(response.content, reads)
    assert payloads[-1] == "[DONE]"
    thought, content, finish, usage = "", "", "", None
    calls: dict[int, list[str]] = {}
    for payload in payloads[:-1]:
        chunk = json.loads(payload)
        assert "error" not in chunk, chunk
        if chunk.get("usage"):
            details = chunk["usage"].get("completion_tokens_details") or {}
            usage = (chunk["usage"]["completion_tokens"], details.get("reasoning_tokens"))
        if not chunk["choices"]:
            continue
        choice = chunk["choices"][0]
        delta = choice["delta"]
        kinds = {"reasoning": "reasoning_content" in delta or "reasoning" in delta, "content": bool(delta.get("content"))}
        kinds["tool_calls"] = "tool_calls" in delta
        assert sum(kinds.values()) <= 1, f"one kind of delta per chunk: {delta}"
        thought += delta.get("reasoning_content", delta.get("reasoning", "")) or ""
        content += delta.get("content") or ""
        for call in delta.get("tool_calls", ()):
            entry = calls.setdefault(call["index"], ["", "", ""])
            entry[0] = entry[0] or call.get("id", "")
            entry[1] = entry[1] or call.get("function", {}).get("name", "")
            entry[2] += call.get("function", {}).get("arguments", "")
        finish = choice["finish_reason"] or finish
    assembled = tuple((c[0], c[1], c[2]) for _, c in sorted(calls.items()))
    return Assembled(thought, content, assembled, finish, usage)


async def responses_helper(client: openai.AsyncOpenAI) -> Assembled:
    async with client.responses.stream(model="m", input="hi") as stream:
        final = await stream.get_final_response()
    thought = text_ = ""
    calls = []
    for item in final.output:
        if item.type == "reasoning":
            thought += "".join(part.text for part in item.content or ())
        elif item.type == "message":
            text_ += "".join(part.text for part in item.content if part.type == "output_text")
        elif item.type == "function_call":
            calls.append((item.call_id, item.name, item.arguments))
    assert final.status == "completed" and final.usage is not None
    usage = (final.usage.output_tokens, final.usage.output_tokens_details.reasoning_tokens)
    finish = "tool_calls" if calls else "stop"  # the API has no finish reason: calls or not
    return Assembled(thought, text_, tuple(calls), finish, usage)


async def messages_helper(client: anthropic.AsyncAnthropic) -> Assembled:
    async with client.messages.stream(model="m", max_tokens=64, messages=USER) as stream:  # type: ignore[arg-type]
        final = await stream.get_final_message()
    thought = text_ = ""
    calls = []
    for block in final.content:
        if block.type == "thinking":
            thought += block.thinking
            assert block.signature, "every thinking block is signed"
        elif block.type == "text":
            text_ += block.text
        elif block.type == "tool_use":
            calls.append((block.id, block.name, block.input))
    finish = {"end_turn": "stop", "tool_use": "tool_calls"}[str(final.stop_reason)]
    # ``input`` is the parsed arguments: compared as JSON values, not text.
    normalised = tuple((call_id, name, json.dumps(value, sort_keys=True)) for call_id, name, value in calls)
    return Assembled(thought, text_, normalised, finish, (final.usage.output_tokens, -1))


def as_anthropic(want: Assembled) -> Assembled:
    calls = tuple((call_id, name, json.dumps(json.loads(args), sort_keys=True)) for call_id, name, args in want.calls)
    return Assembled(want.reasoning, want.text, calls, want.finish, (want.usage[0] if want.usage else 0, -1))


async def one_case(script: Script, reads: list[int], include_usage: bool, reasoning_field: str) -> None:
    backend = ScriptedBackend()
    backend.script = script
    settings_ = Settings(sweep_interval_s=0.05, reasoning_field=reasoning_field)
    async with make_client(settings_, backend) as (client, _):
        oai = openai.AsyncOpenAI(base_url="http://localhost/v1", api_key="unused", http_client=client, max_retries=0)
        transport = httpx2.ASGITransport(app=client.app)  # type: ignore[attr-defined]
        http = httpx2.AsyncClient(transport=transport, base_url="http://localhost", timeout=10)
        claude = anthropic.AsyncAnthropic(base_url="http://localhost", api_key="k", http_client=http, max_retries=0)
        want = expected(script.output)
        assert await chat_helper(oai, include_usage) == expected(script.output, usage=include_usage), "openai chat stream"
        assert await chat_raw(client, reads, include_usage) == expected(script.output, usage=include_usage), "raw SSE"
        assert await responses_helper(oai) == want, "openai responses stream"
        assert await messages_helper(claude) == as_anthropic(want), "anthropic messages stream"
        await http.aclose()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    script=scripts(),
    reads=st.lists(st.integers(1, 97), min_size=1, max_size=5),
    include_usage=st.booleans(),
    reasoning_field=st.sampled_from(["reasoning_content", "reasoning", "both"]),
)
def test_every_client_assembles_the_same_answer_however_it_was_split(
    script: Script, reads: list[int], include_usage: bool, reasoning_field: str
) -> None:
    asyncio.run(asyncio.wait_for(one_case(script, reads, include_usage, reasoning_field), 60))


def test_the_harness_sees_a_wrong_answer() -> None:
    """The comparison can fail: a node that drops one piece of its reasoning is caught."""
    output = Output("thinking hard", "Hi", ())
    script = Script(output, ["thinking ", "hard"], ["Hi"], [], False, None)

    class Lossy(ScriptedBackend):
        async def _answer(self, request: DownstreamRequest) -> None:
            chunks = script.wire(request.request_id)
            chunks[1].text = "soft"
            self.deliver(chunks)

    async def run() -> Assembled:
        async with make_client(backend=Lossy()) as (client, _):
            oai = openai.AsyncOpenAI(base_url="http://localhost/v1", api_key="u", http_client=client, max_retries=0)
            return await responses_helper(oai)

    got = asyncio.run(run())
    assert got.reasoning == "thinking soft" and got != expected(output)
