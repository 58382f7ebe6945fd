"""A tiny real ``CLIPModel`` contrastively pretrained offline on upright handwritten digits, cached like the tiny zoo.

It gives prompt tuning and zero-shot benchmarks a dual encoder that actually knows the digits, built in a minute or two.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time

from vlmfit.models.tiny.corpus import DIGIT_WORDS, cache_root, cached_build, corpus, mnist_digits

CLIP_NAME = "clip-digits-v1"

# Pretraining captions. None is "a photo of a {word}.": that wording is the prompt-tuning starting point, and it is
# meant to be a somewhat unfamiliar prompt to the model (its words are in the vocabulary but "photo" is never seen).
TEMPLATES = (
    "handwritten digit {word}",
    "the number {word}",
    "a drawing of a {word}",
    "{word}, written by hand",
    "a scanned digit: {word}",
    "an image of the numeral {word}",
)
PHOTO_PROMPT = "a photo of a {word}."

MAX_TEXT_LEN = 32  # every caption is padded to this length, so learned context tokens have fixed positions
_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081  # upright MNIST pixel statistics (scaled to [0, 1])
# Small batches: with ten classes, every other same-digit caption in a batch is a false negative for CLIP's loss, so
# many small steps learn more per second than few large ones (same ~55 s of CPU: batch 128 x 300 steps reached 52%
# upright zero-shot accuracy, 32 x 1000 77%, 16 x 2000 81%).
_TRAIN = dict(steps=3000, batch_size=16, lr=1e-3, weight_decay=0.1, warmup=100)
# VLMFIT_TINY_CLIP_STEPS builds a shorter-pretrained CLIP into a cache folder of its own (the test suite uses 1,500
# steps: about half the build time, a weaker but still digit-aware model); unset, users get the 3,000 above.
STEPS_ENV = "VLMFIT_TINY_CLIP_STEPS"


def pretraining_steps() -> int:
    return int(os.environ.get(STEPS_ENV) or _TRAIN["steps"])


def clip_name() -> str:
    steps = pretraining_steps()
    return CLIP_NAME if steps == _TRAIN["steps"] else f"{CLIP_NAME}-{steps}steps"


# --- build -----------------------------------------------------------------------------------------------------


def _tokenizer():
    """A CLIPTokenizer over a ~1k BPE vocabulary trained on the captions, laid out like openai/clip's vocab.

    CLIP's BPE marks word ends with "</w>"; the vocabulary carries every byte with and without that suffix (as the
    real one does), so no text ever maps to the unknown token, which CLIP sets to "<|endoftext|>", the pooled token.
    """
    from tokenizers import pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    captions = [t.format(word=w) for t in (*TEMPLATES, PHOTO_PROMPT) for w in DIGIT_WORDS]
    trainer_tok = CLIPTokenizer()._tokenizer  # the class's own normalizer / pre-tokenizer, so merges match on load
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=alphabet, end_of_word_suffix="</w>",
                                  show_progress=False)  # fmt: skip
    trainer_tok.train_from_iterator(captions * 8 + corpus(), trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    pieces = sorted(alphabet) + [c + "</w>" for c in sorted(alphabet)] + list(learned["vocab"])
    vocab: dict[str, int] = {}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    # Start and end tokens come last, as in openai/clip, so the end token also has the highest id.
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TEXT_LEN)
    for word in DIGIT_WORDS:  # one token per class name keeps the class evidence in one embedding row
        if len(tok(word, add_special_tokens=False)["input_ids"]) != 1:
            raise RuntimeError(f"{word!r} is not one token in the tiny CLIP tokenizer")
    return tok


def _model_and_processor(seed: int):
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = _tokenizer()
    # The text tower pools the hidden state at the FIRST position holding config.eos_token_id (transformers 5.24
    # takes argmax(input_ids) only when eos_token_id == 2, the legacy value). The tokenizer ends each caption with
    # <|endoftext|> and pads with it too, so the first match is the caption's real end; it is also the highest id,
    # so the legacy argmax rule would agree.
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert ids["eos_token_id"] != 2 and ids["eos_token_id"] == len(tok) - 1
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=MAX_TEXT_LEN, **ids)  # fmt: skip
    vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, image_size=28,
                  patch_size=4, num_channels=3)  # fmt: skip
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)
    image = CLIPImageProcessor(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_mean=[_MNIST_MEAN] * 3,
        image_std=[_MNIST_STD] * 3,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return model, CLIPProcessor(image_processor=image, tokenizer=tok)


def _augment(pixels, generator):
    """Small random rotations, scalings and shifts; the border (background) value fills what moves in."""
    import torch
    import torch.nn.functional as F

    n = pixels.shape[0]
    angle = (torch.rand(n, generator=generator) - 0.5) * math.radians(20)
    scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * (4 / 14)  # +-2 px in [-1, 1] grid units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, padding_mode="border", align_corners=False)


def _pretrain(model, processor, images, labels, *, seed: int, steps: int, batch_size: int, lr: float,
              weight_decay: float, warmup: int) -> dict:  # fmt: skip
    import torch
    from transformers import get_cosine_schedule_with_warmup

    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    labels = torch.as_tensor(labels)
    captions = [t.format(word=w) for t in TEMPLATES for w in DIGIT_WORDS]
    text = processor(text=captions, padding="max_length", truncation=True, return_tensors="pt")
    n_templates = len(TEMPLATES)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    model.train()
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(labels), (batch_size,), generator=gen)
        row = torch.randint(n_templates, (batch_size,), generator=gen) * 10 + labels[idx]
        out = model(input_ids=text["input_ids"][row], attention_mask=text["attention_mask"][row],
                    pixel_values=_augment(pixels[idx], gen), return_loss=True)  # fmt: skip
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    model.eval()
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "warmup": warmup,
            "seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads(),
            "loss_first": round(sum(losses[:10]) / 10, 3), "loss_last": round(sum(losses[-10:]) / 10, 3)}  # fmt: skip


# --- evaluation ------------------------------------------------------------------------------------------------


def _image_embeds(model, processor, images, batch_size: int = 256):
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            pixels = processor(images=images[i : i + batch_size], return_tensors="pt")["pixel_values"]
            out.append(model.get_image_features(pixel_values=pixels.to(model.device)).pooler_output)
    return torch.cat(out)


def zero_shot_accuracy(model, processor, images, labels, class_names, template: str, batch_size: int = 256) -> float:
    """Accuracy of CLIP zero-shot classification: each image goes to the class whose caption
    ``template.format(word=name)`` has the most similar embedding."""
    import torch

    if "{word}" not in template:
        raise ValueError(f"template {template!r} has no '{{word}}' placeholder for the class name")
    model.eval()
    captions = [template.format(word=name) for name in class_names]
    text = processor(text=captions, padding="max_length", truncation=True, return_tensors="pt").to(model.device)
    with torch.no_grad():
        text_emb = model.get_text_features(**text).pooler_output
        image_emb = _image_embeds(model, processor, images, batch_size)
    text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
    image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
    pred = (image_emb @ text_emb.T).argmax(-1).cpu()
    return float((pred == torch.as_tensor(list(labels))).float().mean())


def _card(model, processor, test_images, test_labels) -> dict:
    from PIL import ImageOps

    domains = {"upright": lambda im: im, "inverted": ImageOps.invert}
    zero_shot = {}
    for name, shift in domains.items():
        images = [shift(im) for im in test_images]
        zero_shot[name] = {
            key: round(zero_shot_accuracy(model, processor, images, test_labels, DIGIT_WORDS, template), 3)
            for key, template in (("pretraining_template", TEMPLATES[0]), ("photo_prompt", PHOTO_PROMPT))
        }
    return {
        "zero_shot_test_accuracy": zero_shot,
        "zero_shot_templates": {"pretraining_template": TEMPLATES[0], "photo_prompt": PHOTO_PROMPT},
    }


def build_tiny_clip(out_dir: str | os.PathLike, *, seed: int = 0) -> pathlib.Path:
    """Build, pretrain on builtin:mnist's train split, evaluate and save the tiny CLIP (model, processor, card)."""
    import torch

    out = pathlib.Path(out_dir)
    digits = mnist_digits()  # builtin:mnist's split: the same 4,000 train and 1,000 test digits
    train_images, train_labels = _pil(digits["train"][0]), digits["train"][1].tolist()
    test_images, test_labels = _pil(digits["test"][0]), digits["test"][1].tolist()
    model, processor = _model_and_processor(seed)
    training = _pretrain(model, processor, train_images, train_labels, seed=seed, **{**_TRAIN, "steps": pretraining_steps()})
    card = {
        "model": "CLIPModel pretrained contrastively on builtin:mnist train (4,000 upright digits)",
        "params": sum(p.numel() for p in model.parameters()),
        "templates": list(TEMPLATES),
        "seed": seed,
        "training": training,
        "torch": torch.__version__,
        **_card(model, processor, test_images, test_labels),
    }
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "clip_card.json").write_text(json.dumps(card, indent=2) + "\n")
    return out


def _pil(images) -> list:
    from PIL import Image

    return [Image.fromarray(im).convert("RGB") for im in images]


def tiny_clip_path(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Directory of the cached tiny CLIP, built on first use (safe across concurrent processes)."""
    return cached_build(cache_root(cache_dir) / clip_name(), build_tiny_clip)
