"""Preference pairs from labelled data: chosen = the correct answer, rejected = a wrong label or an evasive
non-answer ("The image does not provide that information."), the kind of pair that teaches a VLM to look."""

from __future__ import annotations

import random

from vlmfit.chat.schema import ROW, final_answer, prompt_of, text_part

EVASIVE = "The image does not provide that information."


def pairs_from_labelled(dataset, labels: list[str], rejected: str = "mixed", seed: int = 0):
    """A preference Dataset (prompt, chosen, rejected, images) with one pair per chat example of `dataset`.

    rejected: "wrong_label" (another class, chosen at random), "evasive" (EVASIVE), or "mixed" (half each).
    """
    import datasets

    if rejected not in ("wrong_label", "evasive", "mixed"):
        raise ValueError(f"rejected must be wrong_label, evasive or mixed, not {rejected!r}")
    def pair(ex, idx):
        answer = final_answer(ex["messages"])
        kind = rejected if rejected != "mixed" else ("evasive" if idx % 2 else "wrong_label")
        rng = random.Random(f"{seed}:{idx}")  # per row: the same pairs whatever order rows are mapped in
        bad = EVASIVE if kind == "evasive" else rng.choice([lab for lab in labels if lab != answer])
        return {
            "prompt": prompt_of(ex["messages"]),
            "chosen": [{"role": "assistant", "content": [text_part(answer)]}],
            "rejected": [{"role": "assistant", "content": [text_part(bad)]}],
        }

    out = dataset.map(pair, with_indices=True, load_from_cache_file=False, remove_columns=[c for c in dataset.column_names if c not in ("images", ROW)])
    assert isinstance(out, datasets.Dataset)
    return out
