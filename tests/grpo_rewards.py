"""Reward functions the GRPO tests load by path (tests/grpo_rewards.py:NAME), as a user's own rewards.py would be."""


def length(completions, **columns):
    """Longer completions score higher: differs inside every group, so every group has an advantage."""
    return [float(len(c)) for c in completions]


def broken(completions, **columns):
    return [1 / 0 for _ in completions]


def short(completions, **columns):
    return [1.0]


def text(completions, **columns):
    return [1.0, "yes"][: len(completions)]


def uses_columns(completions, answer, label, **columns):
    """Sees the example's own columns: 1 when the completion names the answer and the label is an int."""
    return [float(a in c and isinstance(lbl, int)) for c, a, lbl in zip(completions, answer, label)]
