"""Metrics of free answers against references, per task, each headline figure with a bootstrap confidence interval:
- exact match (vlmfit's normalisation: case and punctuation);
- VQA accuracy with the VQA evaluation's answer normalisation (articles dropped, number words as digits, ...):
  min(1, matching references / 3) averaged over the leave-one-out subsets when there are several references,
  exact match on the normalised answer when there is one;
- ChartQA's relaxed accuracy: a numeric answer within 5% of a numeric reference counts, else a case-insensitive
  exact match (as pix2struct's reference implementation: "ten" is not "10");
- classification: a confusion matrix beside the accuracy.
- captions: BLEU-4, ROUGE-L and CIDEr-D from the COCO caption scorers (evaluate/captions.py), beside exact match."""

from __future__ import annotations

import re
import string

import numpy as np

_ANY_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Case and punctuation folded, whitespace collapsed: what 'the same answer' means for exact match."""
    return " ".join(_ANY_PUNCT.sub(" ", text.lower()).split())


_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}
_NUM_PUNCT = re.compile(r"(?<=\d),(?=\d)")  # 1,000 -> 1000
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:']")


def vqa_normalize(text: str) -> str:
    t = _NUM_PUNCT.sub("", text.lower().strip())
    t = _PUNCT.sub(" ", t)
    t = re.sub(r"(?<!\d)\.(?!\d)", " ", t)  # periods, but not decimal points
    words = [_NUMBERS.get(w, w) for w in t.split() if w not in _ARTICLES]
    return " ".join(words)


def exact_match(pred: str, refs: list[str]) -> float:
    p = normalize(pred)
    return float(any(p == normalize(r) for r in refs))


def vqa_accuracy(pred: str, refs: list[str]) -> float:
    p, norm = vqa_normalize(pred), [vqa_normalize(r) for r in refs]
    if len(norm) < 3:
        return float(p in norm)
    scores = [min(1.0, sum(p == r for j, r in enumerate(norm) if j != i) / 3) for i in range(len(norm))]
    return float(np.mean(scores))


def _number(text: str) -> float | None:
    t = text.strip().rstrip("%").replace(",", "").strip()
    try:
        return float(t)
    except ValueError:
        return None


def relaxed_accuracy(pred: str, refs: list[str], tolerance: float = 0.05) -> float:
    """ChartQA (Masry et al. 2022): numeric answers within `tolerance` relative error, others exactly (normalised)."""
    for ref in refs:
        r, p = _number(ref), _number(pred)
        if r is not None and p is not None:
            if (p == r) if r == 0 else abs(p - r) / abs(r) <= tolerance:
                return 1.0
        elif pred.strip().lower() == ref.strip().lower():  # as the reference implementation (pix2struct): no other folding
            return 1.0
    return 0.0


def bootstrap_ci(values, n: int = 1000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile interval of the mean of per-example scores over `n` resamples with replacement."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return [float("nan"), float("nan")]
    idx = np.random.default_rng(seed).integers(0, len(v), size=(n, len(v)))
    means = v[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [round(float(lo), 4), round(float(hi), 4)]


METRICS = {"exact_match": exact_match, "vqa_accuracy": vqa_accuracy, "relaxed_accuracy": relaxed_accuracy}
TASK_METRICS = {"vqa": ("exact_match", "vqa_accuracy", "relaxed_accuracy"), "chat": ("exact_match",),
                "caption": ("exact_match",), "classification": ("exact_match",)}


def score_answers(task: str, answers: list[str], references: list[list[str]]) -> dict:
    """{metric: {"value", "ci95", "per_example"}} for the task's metrics."""
    out = {}
    for name in TASK_METRICS.get(task, ("exact_match",)):
        per = [METRICS[name](a, refs) for a, refs in zip(answers, references)]
        out[name] = {"value": round(float(np.mean(per)), 4) if per else float("nan"), "ci95": bootstrap_ci(per),
                     "per_example": per}
    if task == "caption":
        from vlmfit.evaluate.captions import caption_scores

        out.update(caption_scores(answers, references))
    return out


def confusion_matrix(gold: list[str], predicted: list[str], labels: list[str]) -> dict:
    """rows: gold label, columns: predicted label (anything else under "other")."""
    cols = list(labels) + (["other"] if any(p not in labels for p in predicted) else [])
    m = {g: {c: 0 for c in cols} for g in labels}
    for g, p in zip(gold, predicted):
        if g in m:
            m[g][p if p in labels else "other"] += 1
    return {"labels": list(labels), "columns": cols, "counts": [[m[g][c] for c in cols] for g in labels]}
