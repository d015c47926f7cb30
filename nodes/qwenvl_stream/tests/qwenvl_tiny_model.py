"""A tiny, randomly initialised Qwen2.5-VL saved to a directory, for tests.

Built from a config with no hub access: a byte-level BPE tokenizer trained
here with Qwen's special tokens, a config whose token ids match that
tokenizer exactly, a Qwen2-VL image processor and a Qwen-style chat
template. About 200k parameters; it loads and generates on a CPU in a
second or two. Its answers are random text, so tests assert on structure
(chunks, seq, finish reason), never on content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's chat template in spirit (not copied): a default system turn,
# images as <|vision_start|><|image_pad|><|vision_end|>, any role name.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! What is in this picture? A red square on a white table.",
    "Streaming tokens one by one over a dora dataflow, with sequence numbers.",
    "Describe the image in one sentence. The answer is short and clear.",
    "system user assistant tool You are a helpful assistant.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}",
]


def _train_tokenizer(path: Path) -> dict[str, int]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    ids: dict[str, int] = {}
    for token in SPECIAL_TOKENS:
        token_id = tokenizer.token_to_id(token)
        assert token_id is not None, token
        ids[token] = token_id
    return ids | {"vocab_size": tokenizer.get_vocab_size()}


@dataclass(frozen=True)
class ModelSize:
    """The dimensions that differ between the tests' tiny model and the benchmark's larger one."""

    hidden: int = 32
    intermediate: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    mrope_section: tuple[int, int, int] = (2, 1, 1)  # sums to head_dim / 2 (head_dim = hidden / heads)
    max_positions: int = 2048
    vision_hidden: int = 32
    vision_intermediate: int = 64
    # Small images keep the vision path cheap: at most 16 merged patches.
    max_pixels: int = 4 * 28 * 28 * 4


def build_tiny_model(path: Path, size: ModelSize = ModelSize()) -> Path:
    """Write a random Qwen2.5-VL (model, tokenizer, image processor, template) of ``size`` to ``path``."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    path.mkdir(parents=True, exist_ok=True)
    ids = _train_tokenizer(path)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": ids["vocab_size"],
            "hidden_size": size.hidden,
            "intermediate_size": size.intermediate,
            "num_hidden_layers": size.layers,
            "num_attention_heads": size.heads,
            "num_key_value_heads": size.kv_heads,
            "max_position_embeddings": size.max_positions,
            "rope_scaling": {"type": "mrope", "mrope_section": list(size.mrope_section), "rope_theta": 10000.0},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 1,
            "hidden_size": size.vision_hidden,
            "intermediate_size": size.vision_intermediate,
            "num_heads": 2,
            "out_hidden_size": size.hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    _prefer_word_tokens(model, path)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    model.save_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=size.max_pixels, patch_size=14, merge_size=2)
    image_processor.save_pretrained(path)
    (path / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return path


def _prefer_word_tokens(model: Any, path: Path) -> None:
    """Zero the output rows of tokens that are not letters and spaces, and scale up the others.

    A random model otherwise emits control bytes and punctuation, which
    ``TextIteratorStreamer`` holds back until the next space, so its pieces
    would come far apart; real models write words. End of text is one of the
    zeroed rows, so answers run to ``max_tokens`` (``length``).
    """
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    words = torch.tensor(
        [
            (text := str(tokenizer.decode([i]))).strip() != "" and all(c == " " or c.isascii() and c.isalpha() for c in text)
            for i in range(model.config.text_config.vocab_size)
        ]
    )
    with torch.no_grad():
        weight = model.lm_head.weight
        weight[~words] = 0
        weight[words] *= 20
