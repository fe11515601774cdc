"""A tiny random-weight Llava (CLIP vision + Llama text) built from configs, for tests, benchmarks and the demo.

Nothing is downloaded: the tokenizer is a byte-level BPE assembled in memory and the weights come from
``torch.manual_seed(seed)``. The same ``TinyLlavaSpec`` and seed give the same model and the same token ids in
every process (the byte-level alphabet is a Python set, so it is sorted before ids are assigned).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)
# A few merges so that digits exist both bare and with a leading space ("0" and "Ġ0"): the referee must read
# every token id that decodes to a digit, and the tests check that it does.
MERGES = (("Ġ", "0"), ("Ġ", "1"), ("Ġ", "t"), ("Ġ", "a"), ("e", "r"), ("i", "n"), ("o", "n"), ("Ġ", "s"))
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class TinyLlavaSpec(BaseModel):
    """Sizes of the random Llava. The defaults are the test size (builds in well under a second)."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 128
    # Wider than transformers' 0.02 so a random model's next-token logits differ clearly between prompts
    # (with 0.02 every p_yes sits near 0.5 and an argmax test would compare noise).
    initializer_range: float = 0.2
    vocab_size: int | None = None  # None = the tokenizer's size; larger pads the embedding like real models


# ~25M parameters: the size the referee benchmark uses ("small but not tiny").
BENCH_SPEC = TinyLlavaSpec(
    image_size=224, patch_size=14, vision_hidden=256, vision_layers=4, vision_heads=4,
    text_hidden=512, text_layers=6, text_heads=8, text_intermediate=1376,
)
# llava-1.5-7b's shapes (CLIP ViT-L/14-336 + a Llama-2-7B-sized decoder, 32k vocabulary): the GPU check.
LLAVA_7B_SPEC = TinyLlavaSpec(
    image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
    text_hidden=4096, text_layers=32, text_heads=32, text_intermediate=11008, vocab_size=32064,
    initializer_range=0.02,
)


def build_tokenizer() -> Any:
    """Byte-level BPE over the sorted 256-symbol alphabet plus ``MERGES``; special tokens come first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=list(MERGES), unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(spec: TinyLlavaSpec) -> Any:
    """A ``LlavaProcessor`` whose image processor resizes and centre-crops to ``spec.image_size``."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    side = spec.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=spec.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )


def build_model(spec: TinyLlavaSpec, tokenizer: Any, seed: int = 0, device: str = "cpu", dtype: Any = None) -> Any:
    """A ``LlavaForConditionalGeneration`` with weights drawn from ``seed``, in eval mode.

    The weights are created directly on ``device`` in ``dtype`` (default float32), so a 7B-sized random
    model can be built on a GPU without a CPU copy; only CPU float32 builds are reproducible bit for bit.
    """
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        image_size=spec.image_size, patch_size=spec.patch_size, hidden_size=spec.vision_hidden,
        intermediate_size=4 * spec.vision_hidden, num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads, projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=spec.vocab_size or len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=spec.initializer_range,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def build_tiny_llava(
    spec: TinyLlavaSpec | None = None, seed: int = 0, device: str = "cpu", dtype: Any = None
) -> tuple[Any, Any]:
    """Return ``(model, processor)`` for a random Llava of size ``spec`` (default: the test size)."""
    spec = spec or TinyLlavaSpec()
    processor = build_processor(spec)
    return build_model(spec, processor.tokenizer, seed, device, dtype), processor
