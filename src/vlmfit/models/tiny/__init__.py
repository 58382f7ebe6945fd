"""The offline zoo: tiny random-init chat VLMs of the real transformers classes (zoo.py), a tiny CLIP pretrained
on handwritten digits (clip.py), and what they share (corpus.py: digit words, tokenizer corpus, MNIST, cache)."""

from vlmfit.models.tiny.clip import clip_name, tiny_clip_path
from vlmfit.models.tiny.corpus import DIGIT_WORDS, cache_root
from vlmfit.models.tiny.zoo import TINY_FAMILIES, describe_tiny, tiny_path

__all__ = ["clip_name", "DIGIT_WORDS", "TINY_FAMILIES", "cache_root", "describe_tiny", "tiny_clip_path", "tiny_path"]
