"""Rewards for method grpo, as plain Python: the built-in ones and the user's own (`path/to/rewards.py:function` or
`module:function`). Every reward is called as fn(completions, **columns) -> one number per completion, where
completions are the generated replies as text and the columns are the example's own (answer, label, images, row,
and any other column of the data), one entry per completion. None means "does not apply" (TRL skips it in the mean).

A reward that raises, returns the wrong count or a value that is not a number ends the run with the reward's name,
the row and the value (UserError: exit 2), never a traceback from inside the trainer."""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from pathlib import Path
from typing import Callable

from vlmfit.chat.schema import ROW
from vlmfit.errors import UserError, nearest

ANSWER = "answer"  # the column with the reference reply (the example's last assistant turn)


def normalise(text: str) -> str:
    """Lower case, articles and punctuation out, whitespace squeezed (SQuAD's answer normalisation)."""
    text = re.sub(r"\b(a|an|the)\b", " ", str(text).lower())
    text = re.sub(r"[^\w\s.\-]", " ", text)
    return " ".join(text.split()).strip(" .")


def answer_part(text: str) -> str:
    """The text inside <answer>...</answer> when the completion has one, else the whole completion."""
    m = re.search(r"<answer>(.*?)</answer>", text, re.S)
    return (m.group(1) if m else text).strip()


def exact_match(completions, answer, **_):
    """1 when the completion (its <answer> part, if any) is the reference answer (its <answer> part, if any) exactly,
    outer spaces aside."""
    return [float(answer_part(c) == answer_part(str(a))) for c, a in zip(completions, answer)]


def normalised_match(completions, answer, **_):
    """1 when the two agree after normalise() (case, articles, punctuation, spacing)."""
    return [float(normalise(answer_part(c)) == normalise(answer_part(str(a)))) for c, a in zip(completions, answer)]


_NUMBER = re.compile(r"(?<![\d.])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\d.]*\d)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def _number(text: str) -> float | None:
    """The last plain number in the text (1,234.5 and 1e-3 read as such; a dotted run like 1.2.3 or an IP is none)."""
    found = _NUMBER.findall(_THOUSANDS.sub("", str(text)))
    try:
        return float(found[-1]) if found else None
    except ValueError:
        return None


def numeric(completions, answer, tolerance: float = 0.0, relative: bool = False, **_):
    """1 when the last number in the completion is within `tolerance` of the answer's (relative: of its size)."""
    out = []
    for c, a in zip(completions, answer):
        got, want = _number(answer_part(c)), _number(a)
        if got is None or want is None:
            out.append(0.0)
            continue
        allowed = tolerance * abs(want) if relative else tolerance
        out.append(float(abs(got - want) <= allowed + 1e-12))
    return out


_CHOICE_FORMS = (
    re.compile(r"answer\s*(?:is|:)?\s*\(?([A-Za-z])\b\)?", re.I),  # "the answer is B", "Answer: (c)"
    re.compile(r"\(([A-Za-z])\)"),  # "(B)"
    re.compile(r"^\s*([A-Za-z])(?:[).:]|\s*$)"),  # "B." / "B)" / "B" at the start
    re.compile(r"\b([A-Z])\s*[.)]?\s*$"),  # a capital option letter ending the reply: "I think it is B"
)


def _choice(text: str) -> str | None:
    """The option letter a reply gives: its explicit forms first, the last of each kind, case-insensitive."""
    for form in _CHOICE_FORMS:
        found = form.findall(str(text))
        if found:
            return found[-1].upper()
    return None


def multiple_choice(completions, answer, **_):
    """1 when the option letter the completion gives ("the answer is B", "(b)", "B." at the start) is the answer's."""
    out = []
    for c, a in zip(completions, answer):
        got, want = _choice(answer_part(c)), _choice(answer_part(str(a)))
        out.append(float(got is not None and got == want))
    return out


_FORMAT = re.compile(r"^\s*<think>(?:(?!</think>).)+</think>\s*<answer>(?:(?!</answer>|<answer>).)+</answer>\s*$", re.S)


def format_reward(completions, **_):
    """1 for the <think>...</think><answer>...</answer> form and nothing else around it, else 0."""
    return [float(bool(_FORMAT.match(c))) for c in completions]


def length_penalty(completions, target: int = 0, per_char: float = 0.01, **_):
    """-per_char for each character beyond `target` (0: every character), so shorter correct replies win ties."""
    return [-per_char * max(0, len(c) - target) for c in completions]


BUILTIN: dict[str, Callable] = {
    "exact_match": exact_match, "normalised_match": normalised_match, "numeric": numeric,
    "multiple_choice": multiple_choice, "format": format_reward, "length_penalty": length_penalty,
}


def resolve(spec: str, where: str) -> Callable:
    """A reward by name: a built-in, `path/to/file.py:function` or `package.module:function`."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        close = nearest(spec, list(BUILTIN))
        raise UserError(f"unknown reward '{spec}'" + (f" (did you mean {close}?)" if close else ""), where=where,
                        hint=f"a built-in ({', '.join(BUILTIN)}) or your own as path/to/rewards.py:function or "
                        "module:function")
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise UserError(f"reward file {path} does not exist", where=where, hint="give the path of a .py file, then :function")
        module_name = f"vlmfit_reward_{abs(hash(str(path.resolve())))}"
        spec_ = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec_)
        sys.modules[module_name] = module  # pickling (dataloader workers) finds it by name
        try:
            spec_.loader.exec_module(module)
        except Exception as e:  # the user's file: say where it failed, not a traceback of ours
            raise UserError(f"importing {path} failed: {type(e).__name__}: {e}", where=where) from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise UserError(f"cannot import module '{target}': {e}", where=where,
                            hint="give a file path (rewards.py:function) or an importable module") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        found = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise UserError(f"{target} has no function '{name}'", where=where, hint=f"functions there: {', '.join(found[:10]) or 'none'}")
    return fn


class Reward:
    """One configured reward as TRL calls it (prompts, completions, completion_ids, **columns): the completions as
    text, the example's columns, the recipe's own arguments; its result checked before it reaches the trainer.
    `__name__` is what TRL logs it under (rewards/<name>/mean)."""

    def __init__(self, spec: str, name: str, kwargs: dict, where: str):
        self.fn = resolve(spec, where)
        self.spec, self.__name__, self.kwargs, self.where = spec, name, dict(kwargs), where

    def __call__(self, prompts=None, completions=None, completion_ids=None, **columns):
        texts = [completion_text(c) for c in completions]
        for k in ("trainer_state", "log_extra", "log_metric", "environments"):
            columns.pop(k, None)
        rows = columns.get(ROW) or list(range(len(texts)))
        try:
            values = self.fn(texts, **{**columns, **self.kwargs})  # the recipe's arguments win over a same-named column
        except Exception as e:
            raise UserError(f"reward '{self.__name__}' raised {type(e).__name__}: {e} (on a batch of source rows "
                            f"{_rows(rows)})", where=self.where, hint="fix the reward function; it is called as "
                            "fn(completions, **columns) with one completion text per entry") from None
        values = list(values) if values is not None else None
        if values is None or len(values) != len(texts):
            raise UserError(f"reward '{self.__name__}' returned {'None' if values is None else len(values)} values for "
                            f"{len(texts)} completions (source rows {_rows(rows)})", where=self.where,
                            hint="return one number (or None) per completion, in order")
        out = []
        for i, v in enumerate(values):
            if v is None:
                out.append(None)
                continue
            if isinstance(v, bool) or (isinstance(v, (int, float)) and math.isfinite(float(v))):
                out.append(float(v))
                continue
            if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 and math.isfinite(float(v.item())):
                out.append(float(v.item()))
                continue
            raise UserError(f"reward '{self.__name__}' returned {v!r} for source row {rows[i]} (completion "
                            f"{texts[i][:80]!r}): not a finite number", where=self.where,
                            hint="return a float (or None when the reward does not apply)")
        return out


def completion_text(c) -> str:
    """TRL hands conversational completions as [{"role": "assistant", "content": ...}]; the reward sees the text."""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c and isinstance(c[-1], dict):
        content = c[-1].get("content", "")
        if isinstance(content, list):
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return str(content)
    return str(c)


def _rows(rows) -> str:
    shown = sorted({int(r) if isinstance(r, (int, float)) else r for r in rows}, key=str)[:10]
    return ", ".join(map(str, shown)) + (", ..." if len(set(map(str, rows))) > 10 else "")


def rewards_for(specs, where: str = "grpo.rewards") -> tuple[list[Reward], list[float]]:
    """The configured rewards (grpo.rewards entries) and their weights."""
    rewards, weights, names = [], [], set()
    for i, r in enumerate(specs):
        name = r.name or r.fn.rsplit(":", 1)[-1]
        if name in names:
            name = f"{name}_{i}"
        names.add(name)
        rewards.append(Reward(r.fn, name, r.args, f"{where}[{i}] ({r.fn})"))
        weights.append(r.weight)
    return rewards, weights
