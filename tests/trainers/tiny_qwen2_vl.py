"""A tiny random-weight Qwen2-VL and its processor, built offline from configs: what TRL's SFTTrainer trains in
tests/trainers/test_trl_trains.py.

Qwen2-VL because it is the family people fine-tune with TRL's vision SFT (Qwen2.5-VL / Qwen3-VL share its
processor contract: typed content parts, variable-resolution images, ``image_grid_thw``). Nothing is downloaded:
the tokenizer is a byte-level BPE assembled in memory (the byte alphabet is a Python set, so it is sorted before
ids are assigned, or ids change between processes), the image and video processors are their classes' defaults
with a small pixel budget, and the weights come from ``torch.manual_seed(seed)``.
"""

from __future__ import annotations

from typing import Any

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", IMAGE_TOKEN, VIDEO_TOKEN,
)
# Qwen2-VL's template, cut to what the export uses: string content or typed parts ({"type": "image"} and
# {"type": "text", "text": ...}; the export's image parts carry "text": null, which must not print). Every turn
# ends with <|im_end|> (the EOS), so an SFT model learns to stop; {% generation %} marks the assistant's tokens
# for TRL's assistant_only_loss. transformers renders with trim_blocks, hence {{ '\n' }} after a block tag.
CHAT_TEMPLATE = (
    "{% macro render(content) %}{% if content is string %}{{ content }}{% else %}{% for part in content %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endmacro %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ render(message['content']) }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ render(message['content']) }}<|im_end|>{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PATCH = 14
MERGE = 2
# Images are resized to between 2x2 and 4x4 merged patches: 4 to 16 image tokens each, whatever the input size.
MIN_PIXELS = (PATCH * MERGE * 2) ** 2
MAX_PIXELS = (PATCH * MERGE * 4) ** 2


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN},
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor() -> Any:
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    video_processor = Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tokenizer: Any, seed: int = 0) -> Any:
    """A ~0.2M-parameter ``Qwen2VLForConditionalGeneration`` (1-layer vision tower, 2-layer decoder), float32."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    hidden, heads = 64, 4  # head_dim 16: mrope_section must sum to head_dim / 2
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": heads, "num_key_value_heads": 2, "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 1, "embed_dim": 32, "hidden_size": hidden, "num_heads": 2, "mlp_ratio": 2,
            "patch_size": PATCH, "spatial_merge_size": MERGE, "temporal_patch_size": 2,
        },
        image_token_id=ids(IMAGE_TOKEN), video_token_id=ids(VIDEO_TOKEN),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_tiny_qwen2_vl(seed: int = 0) -> tuple[Any, Any]:
    """``(model, processor)``: same seed, same weights and token ids in every process."""
    processor = build_processor()
    return build_model(processor.tokenizer, seed), processor
