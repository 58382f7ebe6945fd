"""Caption metrics with the COCO caption evaluation's own scorers (pycocoevalcap): BLEU-4, ROUGE-L and CIDEr-D
(its Cider class is CIDEr-D: clipped n-gram counts, a Gaussian length penalty, sigma 6, x10).

One difference from the COCO server, said in every result: the text is tokenized in Python (lower case,
punctuation removed, split on white space), because pycocoevalcap's PTBTokenizer runs the Stanford tokenizer in
Java. The confidence intervals resample the examples and recompute each corpus metric on the resample (CIDEr-D's
document frequencies and BLEU's corpus n-gram counts included), not a mean of per-example figures."""

from __future__ import annotations

import re
import string

import numpy as np

TOKENIZER_NOTE = ("tokenized in Python (lower case, punctuation removed, white-space split), not pycocoevalcap's "
                  "Java PTBTokenizer: figures can differ slightly from the COCO server's")
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def tokenize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _corpus(answers: list[str], references: list[list[str]], idx) -> tuple[dict, dict]:
    gts = {k: [tokenize(r) for r in references[i]] or [""] for k, i in enumerate(idx)}
    res = {k: [tokenize(answers[i])] for k, i in enumerate(idx)}
    return gts, res


def _scores(gts: dict, res: dict) -> tuple[dict, dict]:
    """(corpus figures, per-example figures) of BLEU-4, ROUGE-L and CIDEr-D."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    cider, cider_each = Cider().compute_score(gts, res)
    return ({"bleu4": float(bleu[3]), "rouge_l": float(rouge), "cider_d": float(cider)},
            {"bleu4": [float(x) for x in bleu_each[3]], "rouge_l": [float(x) for x in rouge_each],
             "cider_d": [float(x) for x in cider_each]})


def caption_scores(answers: list[str], references: list[list[str]], resamples: int = 200, seed: int = 0,
                   level: float = 0.95) -> dict:
    """{metric: {"value", "ci95", "per_example", "note"}} for BLEU-4, ROUGE-L, CIDEr-D."""
    n = len(answers)
    if n == 0:
        return {m: {"value": float("nan"), "ci95": [float("nan")] * 2, "per_example": [], "note": TOKENIZER_NOTE}
                for m in ("bleu4", "rouge_l", "cider_d")}
    value, each = _scores(*_corpus(answers, references, range(n)))
    rng = np.random.default_rng(seed)
    draws = {m: [] for m in value}
    for _ in range(resamples):
        figures, _ = _scores(*_corpus(answers, references, rng.integers(0, n, size=n)))
        for m, v in figures.items():
            draws[m].append(v)
    out = {}
    for m, v in value.items():
        lo, hi = np.quantile(draws[m], [(1 - level) / 2, 1 - (1 - level) / 2])
        out[m] = {"value": round(v, 4), "ci95": [round(float(lo), 4), round(float(hi), 4)], "per_example": each[m],
                  "note": TOKENIZER_NOTE}
    return out
