"""Offline zoo of tiny random-init VLMs of real transformers classes, saved as HF-format directories.

Each family is built from its real config, model, tokenizer, image/video processor and processor classes, with a
locally trained BPE vocabulary and the family's real special tokens and chat template, and is loaded back through
``AutoProcessor`` / ``AutoModelForImageTextToText.from_pretrained(dir)`` exactly like a hub checkpoint. Nothing is
downloaded.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from vlmfit.models.families import FAMILIES, Family
from vlmfit.models.tiny.corpus import DIGIT_WORDS, cache_root, cached_build, corpus

TINY_VERSION = 2

# --- tokenizer -----------------------------------------------------------------------------------------------


def _train_tokenizer(tokenizer_cls: type, byte_level: bool, core: list[str], named: dict, extra: list[str]):
    """Train a ~1k BPE vocabulary on the embedded corpus and wrap it in the family's own tokenizer class.

    The class rebuilds its own normalizer/pre-tokenizer from vocab + merges on every load (transformers 5), so the
    vocabulary must be trained under a matching pipeline: byte-level families reuse the class's own pipeline;
    SentencePiece-style families (Gemma, Llama) are trained word by word so that no merge spans a space, which keeps
    " seven" / "seven" whole tokens whatever text surrounds them.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

    if byte_level:
        trainer_tok = tokenizer_cls()._tokenizer
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        trainer_tok = Tokenizer(models.BPE())
        trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
        alphabet = ["\n"]  # a piece of its own, as in the real vocabularies, never merged (lines hold none)
    trainer = trainers.BpeTrainer(vocab_size=900, initial_alphabet=alphabet, show_progress=False)
    trainer_tok.train_from_iterator(corpus(), trainer)
    learned = json.loads(trainer_tok.to_str())["model"]

    # Core tokens the class's BPE model needs inside the vocabulary (unk, bos, ...); SentencePiece-style vocabularies
    # also carry the 256 byte-fallback pieces, as the real Gemma and Llama ones do.
    pieces = core + ([f"<0x{b:02X}>" for b in range(256)] if not byte_level else [])
    vocab = {piece: i for i, piece in enumerate(pieces)}
    for piece in learned["vocab"]:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = tokenizer_cls(vocab=vocab, merges=merges, **named)
    specials = [t for t in list(named.values()) + extra if isinstance(t, str)]
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(specials)])
    return tok


# --- chat templates --------------------------------------------------------------------------------------------


def _trl_template(name: str) -> str:
    # TRL ships the chat templates of these checkpoints byte for byte (it recognises models by comparing them), so
    # reusing its copies keeps the tiny models' prompts identical to the real ones and TRL treats them alike.
    return resources.files("trl").joinpath("chat_templates", f"{name}.jinja").read_text(encoding="utf-8")


# llava-hf/llava-1.5-*-hf's template, except that each assistant turn ends with </s> as in LLaVA-1.5's own
# training format (vicuna_v1): the hub template ends assistant text with a space, so a model fine-tuned on it never
# learns to stop.
_LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + eos_token }}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# --- families --------------------------------------------------------------------------------------------------

_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@dataclass(frozen=True)
class _Family:
    model_class: str
    processor_class: str
    tokenizer_class: str
    byte_level: bool
    core: list[str]  # tokens placed first in the vocabulary, in the real id order
    named: dict[str, Any]  # tokenizer kwargs: named and model-specific special tokens, add_bos_token, ...
    extra: list[str]  # further special tokens of the real tokenizer
    template: Callable[[], str]
    build: Callable[[Any, Callable[[str], int], int], tuple[Any, Any]]  # (tokenizer, token id, vocab) -> config, proc
    note: str


def _qwen_build(version: str):
    def build(tok, tid, vocab):
        from transformers import (
            Qwen2_5_VLConfig,
            Qwen2VLConfig,
            Qwen2VLImageProcessor,
            Qwen2VLProcessor,
            Qwen2VLVideoProcessor,
            Qwen3VLConfig,
            Qwen3VLProcessor,
            Qwen3VLVideoProcessor,
        )

        ids = dict(
            image_token_id=tid("<|image_pad|>"),
            video_token_id=tid("<|video_pad|>"),
            vision_start_token_id=tid("<|vision_start|>"),
            vision_end_token_id=tid("<|vision_end|>"),
        )
        text = dict(
            _TEXT, vocab_size=vocab, max_position_embeddings=4096, bos_token_id=tid("<|endoftext|>"),
            eos_token_id=tid("<|im_end|>"), pad_token_id=tid("<|endoftext|>"), tie_word_embeddings=True,
        )  # fmt: skip
        # One LLM token per (merge*patch)^2 pixels; these bounds give 4 tokens for 28x28 and at most 16 tokens.
        if version == "3":
            px, vision = 32, dict(
                depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                num_position_embeddings=64, deepstack_visual_indexes=[0],
            )  # fmt: skip
            text.update(head_dim=16, rope_parameters=dict(
                rope_type="default", rope_theta=5e6, mrope_section=[4, 2, 2], mrope_interleaved=True))  # fmt: skip
            config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
            video = Qwen3VLVideoProcessor(size={"shortest_edge": 2 * 64 * 64, "longest_edge": 8 * 128 * 128})
            proc_cls = Qwen3VLProcessor
        else:
            px = 28
            text.update(rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]))
            if version == "2":
                vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
                config_cls = Qwen2VLConfig
            else:
                vision = dict(
                    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    window_size=112, fullatt_block_indexes=[1],
                )  # fmt: skip
                config_cls = Qwen2_5_VLConfig
            config = config_cls(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
            video = Qwen2VLVideoProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112})
            proc_cls = Qwen2VLProcessor
        size = {"shortest_edge": (2 * px) ** 2, "longest_edge": (4 * px) ** 2}
        # Qwen3-VL normalises with mean = std = 0.5; Qwen2/2.5-VL keep the processor's CLIP statistics.
        norm = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3) if version == "3" else {}
        image = Qwen2VLImageProcessor(size=size, patch_size=px // 2, **norm)
        return config, proc_cls(image_processor=image, tokenizer=tok, video_processor=video)

    return build


def _smolvlm_build(tok, tid, vocab):
    from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor

    # 64x64 images, 8x8 patches, pixel shuffle 4 (as SmolVLM): (64/8)^2 / 4^2 = 4 image tokens per image.
    text = dict(
        _TEXT, model_type="llama", vocab_size=vocab, max_position_embeddings=2048, rope_theta=100000.0,
        bos_token_id=tid("<|im_start|>"), eos_token_id=tid("<end_of_utterance>"), pad_token_id=tid("<|im_end|>"),
    )  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                  patch_size=8)  # fmt: skip
    config = Idefics3Config(
        text_config=text, vision_config=vision, scale_factor=4, image_token_id=tid("<image>"),
        tie_word_embeddings=False,
    )  # fmt: skip
    image = Idefics3ImageProcessor(
        do_image_splitting=False, size={"longest_edge": 64}, max_image_size={"longest_edge": 64}
    )
    return config, Idefics3Processor(image_processor=image, tokenizer=tok, image_seq_len=4)


def _gemma3_build(tok, tid, vocab):
    from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor

    # SigLIP at 56x56 with 14x14 patches -> 4x4 patches, average-pooled to mm_tokens_per_image=4.
    text = dict(
        _TEXT, vocab_size=vocab, head_dim=16, query_pre_attn_scalar=16, sliding_window=64, max_position_embeddings=4096,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=tid("<pad>"), bos_token_id=tid("<bos>"),
        eos_token_id=tid("<eos>"),
    )  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                  patch_size=14, vision_use_head=False)  # fmt: skip
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=tid("<start_of_image>"),
        eoi_token_index=tid("<end_of_image>"), image_token_index=tid("<image_soft_token>"),
        eos_token_id=[tid("<eos>"), tid("<end_of_turn>")],
    )  # fmt: skip
    image = Gemma3ImageProcessor(size={"height": 56, "width": 56})
    return config, Gemma3Processor(image_processor=image, tokenizer=tok, image_seq_length=4)


def _gemma4_build(tok, tid, vocab):
    from transformers import (
        Gemma4AudioFeatureExtractor,
        Gemma4Config,
        Gemma4ImageProcessor,
        Gemma4Processor,
        Gemma4VideoProcessor,
    )

    # The image processor pads every image to max_soft_tokens * pooling^2 patches (70 * 9 = 630 at the smallest
    # supported budget) and resizes to fill it, so a square image gives 64 soft tokens whatever its size; 4x4-pixel
    # patches keep the patch embedding tiny. The text side mixes E2B's per-layer inputs with the bidirectional
    # image attention of the larger checkpoints, so both code paths (and the need for mm_token_type_ids) are tested.
    text = dict(
        _TEXT, vocab_size=vocab, vocab_size_per_layer_input=vocab, hidden_size_per_layer_input=16, head_dim=16,
        global_head_dim=16, sliding_window=64, max_position_embeddings=4096, use_bidirectional_attention="vision",
        layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=30.0,
        pad_token_id=tid("<pad>"), bos_token_id=tid("<bos>"), eos_token_id=tid("<eos>"),
    )  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16, global_head_dim=16, patch_size=4, pooling_kernel_size=3, position_embedding_size=256,
        use_clipped_linears=True,
    )  # fmt: skip
    config = Gemma4Config(
        text_config=text, vision_config=vision, audio_config=None, boi_token_id=tid("<|image>"),
        eoi_token_id=tid("<image|>"), image_token_id=tid("<|image|>"), video_token_id=tid("<|video|>"),
        boa_token_id=tid("<|audio>"), eoa_token_index=tid("<audio|>"), audio_token_id=tid("<|audio|>"),
        eos_token_id=[tid("<eos>"), tid("<turn|>")],
    )  # fmt: skip
    patches = dict(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3)
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=Gemma4ImageProcessor(**patches),
        tokenizer=tok, video_processor=Gemma4VideoProcessor(num_frames=4, **patches), image_seq_length=70,
    )  # fmt: skip
    return config, processor


def _llava_build(tok, tid, vocab):
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaProcessor

    # CLIP at 28x28 with 14x14 patches: 4 patch features (+ CLS, dropped by the "default" strategy) = 4 tokens.
    text = dict(_TEXT, model_type="llama", vocab_size=vocab, max_position_embeddings=2048, bos_token_id=tid("<s>"),
                eos_token_id=tid("</s>"), pad_token_id=tid("<pad>"))  # fmt: skip
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32)  # fmt: skip
    config = LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=tid("<image>"), image_seq_length=4,
        vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=tid("<pad>"),
    )  # fmt: skip
    image = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(
        image_processor=image, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )  # fmt: skip
    return config, processor


def _paligemma_build(tok, tid, vocab):
    from transformers import PaliGemmaConfig, PaliGemmaProcessor, SiglipImageProcessor

    # PaliGemma 2 layout (Gemma 2 text, SigLIP): 28 px, 14 px patches -> 4 image tokens, all prepended to the prompt.
    text = dict(
        _TEXT, model_type="gemma2", vocab_size=vocab, head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
        max_position_embeddings=4096, pad_token_id=tid("<pad>"), bos_token_id=tid("<bos>"), eos_token_id=tid("<eos>"),
    )  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                  patch_size=14, projection_dim=64)  # fmt: skip
    config = PaliGemmaConfig(
        text_config=text, vision_config=vision, image_token_index=tid("<image>"), projection_dim=64, hidden_size=64,
    )  # fmt: skip
    image = SiglipImageProcessor(size={"height": 28, "width": 28}, image_seq_length=4)
    return config, PaliGemmaProcessor(image_processor=image, tokenizer=tok)


_QWEN_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
_QWEN_NAMED = dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)
_GEMMA_CORE = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
_GEMMA_NAMED = dict(pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>", mask_token="<mask>")
_GEMMA4_TOKENS = dict(
    image_token="<|image|>", boi_token="<|image>", eoi_token="<image|>", audio_token="<|audio|>", boa_token="<|audio>",
    eoa_token="<audio|>", sot_token="<|turn>", eot_token="<turn|>", soc_token="<|channel>", eoc_token="<channel|>",
    think_token="<|think|>", escape_token='<|"|>', str_token="<|tool_response>", etr_token="<tool_response|>",
    stc_token="<|tool_call>", etc_token="<tool_call|>", std_token="<|tool>", etd_token="<tool|>",
)  # fmt: skip
_SMOL_GRID = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]

_FAMILIES: dict[str, _Family] = {
    "qwen2_vl": _Family(
        "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen2Tokenizer", True, [], _QWEN_NAMED,
        _QWEN_TOKENS, lambda: _trl_template("qwen2_5_vl"),
        _qwen_build("2"), "dynamic resolution: one token per 28x28 px, 4..16 tokens; M-RoPE; Conv3d patch embed",
    ),  # fmt: skip
    "qwen2_5_vl": _Family(
        "Qwen2_5_VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen2Tokenizer", True, [], _QWEN_NAMED,
        _QWEN_TOKENS, lambda: _trl_template("qwen2_5_vl"),
        _qwen_build("2.5"), "as qwen2_vl plus windowed vision attention (window 112 px, block 1 full)",
    ),  # fmt: skip
    "qwen3_vl": _Family(
        "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen2Tokenizer", True, [], _QWEN_NAMED,
        _QWEN_TOKENS, lambda: _trl_template("qwen3_vl"),
        _qwen_build("3"), "one token per 32x32 px (patch 16), 4..16 tokens; interleaved M-RoPE; DeepStack layer 0",
    ),  # fmt: skip
    "smolvlm": _Family(
        "Idefics3ForConditionalGeneration", "Idefics3Processor", "GPT2Tokenizer", True, [],
        dict(bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|im_end|>",
             unk_token="<|endoftext|>"),
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>", "<global-img>",
         "<end_of_utterance>", *_SMOL_GRID],
        lambda: _trl_template("smolvlm"), _smolvlm_build,
        "SmolVLM layout: 64 px image, pixel shuffle 4, no image splitting; template drops string content",
    ),  # fmt: skip
    "gemma3": _Family(
        "Gemma3ForConditionalGeneration", "Gemma3Processor", "GemmaTokenizer", False, _GEMMA_CORE,
        dict(_GEMMA_NAMED, add_bos_token=True, boi_token="<start_of_image>", eoi_token="<end_of_image>",
             image_token="<image_soft_token>"),
        ["<start_of_turn>", "<end_of_turn>"], lambda: _trl_template("gemma3"), _gemma3_build,
        "fixed 4 soft tokens per image (real: 256); SigLIP 56 px",
    ),  # fmt: skip
    "gemma4": _Family(
        "Gemma4ForConditionalGeneration", "Gemma4Processor", "GemmaTokenizer", False, _GEMMA_CORE,
        dict(_GEMMA_NAMED, **_GEMMA4_TOKENS, add_bos_token=False, extra_special_tokens=["<|video|>"]),
        [], lambda: _trl_template("gemma4_v5"), _gemma4_build,
        "clipped-linear vision tower, 4 px patches, max_soft_tokens 70 (64 tokens for a square image); "
        "needs mm_token_type_ids",
    ),  # fmt: skip
    "llava": _Family(
        "LlavaForConditionalGeneration", "LlavaProcessor", "LlamaTokenizer", False, ["<unk>", "<s>", "</s>"],
        dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>", image_token="<image>",
             add_bos_token=True),
        [], lambda: _LLAVA_TEMPLATE, _llava_build,
        "LLaVA-1.5 layout: CLIP 28 px, 4 tokens; template ends assistant turns with </s>",
    ),  # fmt: skip
    "paligemma": _Family(
        # The detection/segmentation tokens are ordinary vocabulary pieces in the real tokenizer, not special ones.
        "PaliGemmaForConditionalGeneration", "PaliGemmaProcessor", "GemmaTokenizer", False,
        _GEMMA_CORE + [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)],
        dict(_GEMMA_NAMED, add_bos_token=True, image_token="<image>"), [], lambda: None, _paligemma_build,
        "PaliGemma 2 layout: no chat template (prompt/suffix API: processor(text, images, suffix=...)); 4 tokens",
    ),  # fmt: skip
}
TINY_FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def _family(name: str) -> _Family:
    if name not in _FAMILIES:
        raise ValueError(f"unknown tiny model family {name!r}; valid: {', '.join(TINY_FAMILIES)}")
    return _FAMILIES[name]


# --- build / cache ---------------------------------------------------------------------------------------------


def _check_answer_words(tok, family: Family) -> None:
    # A reply must be one token after the assistant marker (with or without a space) as well as after a space or a
    # newline elsewhere, or "did the model answer seven" checks break; fail the build rather than ship such a tokenizer.
    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    start = family.assistant_start or "\n"  # a prefix-LM (PaliGemma) answers after the prompt's "\n"
    for word in DIGIT_WORDS:
        for prefix in (start, start + " ", "\n", "x "):
            ids, head = encode(prefix + word), encode(prefix.rstrip(" "))
            if ids[: len(head)] != head or len(ids) != len(head) + 1:
                raise RuntimeError(f"{word!r} after {prefix!r} is not one token: {tok.convert_ids_to_tokens(ids)}")


def build_tiny(family: str, out_dir: str | os.PathLike, *, seed: int = 0) -> pathlib.Path:
    """Build the tiny model of ``family`` (random init from ``seed``) and save it, HF-style, into ``out_dir``."""
    import torch
    import transformers

    fam = _family(family)
    out = pathlib.Path(out_dir)
    tok = _train_tokenizer(getattr(transformers, fam.tokenizer_class), fam.byte_level, fam.core, fam.named, fam.extra)
    chat = FAMILIES[family]  # markers and turn end: the same table training reads
    _check_answer_words(tok, chat)
    tok.chat_template = fam.template()

    def tid(token: str) -> int:
        idx = tok.convert_tokens_to_ids(token)
        if idx is None or idx == tok.unk_token_id:
            raise RuntimeError(f"{token!r} is not in the {family} tokenizer")
        return idx

    # Like real checkpoints, the embedding table is padded past the tokenizer length (to a multiple of 64).
    vocab = -(-len(tok) // 64) * 64
    config, processor = fam.build(tok, tid, vocab)
    processor.chat_template = tok.chat_template
    if len(processor.tokenizer) > config.get_text_config().vocab_size:  # a processor may add tokens as it is built
        raise RuntimeError(f"{family}: tokenizer has {len(processor.tokenizer)} tokens, embeddings {vocab}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, fam.model_class)(config).eval()
        # Some inits zero a whole matrix (Gemma 3's mm_input_projection_weight). A trained checkpoint never has one,
        # and a zero projector would block every gradient into the vision tower, so give it small random values.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2 and not p.any():
                    p.normal_(0.0, 0.02)
    gen = model.generation_config
    gen.eos_token_id = list(dict.fromkeys([tid(tok.eos_token), tid(chat.turn_end)]))  # stop at the end of a turn
    gen.pad_token_id = tok.pad_token_id
    if tok.bos_token is not None:
        gen.bos_token_id = tok.bos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def tiny_path(family: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Directory of the cached tiny ``family`` model, built on first use (safe across concurrent processes)."""
    _family(family)
    return cached_build(cache_root(cache_dir) / f"{family}-v{TINY_VERSION}", lambda out: build_tiny(family, out))


def describe_tiny(family: str, cache_dir: str | os.PathLike | None = None) -> dict:
    """Short facts about a tiny family for a CLI listing (builds and caches it if needed)."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    from vlmfit.models.meta import meta_model_of

    fam = _family(family)
    path = tiny_path(family, cache_dir)
    processor = AutoProcessor.from_pretrained(path)
    model = meta_model_of(str(path))

    def image_tokens(height: int, width: int) -> int:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit is this?"}]}]
        if processor.chat_template is None:  # PaliGemma: prompt API, image tokens first
            text = processor.image_token + "What digit is this?"
        else:
            text = processor.apply_chat_template(messages, add_generation_prompt=True)
        image = Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8))
        ids = processor(text=text, images=[image], return_tensors="pt")["input_ids"][0]
        return int((ids == model.config.image_token_id).sum())

    return {
        "family": family,
        "model_class": fam.model_class,
        "processor_class": type(processor).__name__,
        "tokenizer_class": type(processor.tokenizer).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "image_tokens_28x28": image_tokens(28, 28),
        "image_tokens_224x224": image_tokens(224, 224),
        "assistant_start": FAMILIES[family].assistant_start,
        "end_of_turn": FAMILIES[family].turn_end,
        "note": fam.note,
    }
