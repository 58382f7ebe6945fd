"""Classification accuracy two ways: constrained (the label with the highest log-likelihood wins) and free
generation (normalized exact match of the generated answer)."""

from __future__ import annotations

import time

import torch

from vlmfit.chat.schema import final_answer, prompt_of, text_part
from vlmfit.chat.collate import VisionChatCollator
from vlmfit.evaluate.tasks import bootstrap_ci, confusion_matrix, normalize, score_answers
from vlmfit.models.loss import sequence_logprobs

CAPTION_METRICS = ("bleu4", "rouge_l", "cider_d")  # scores, not rates: printed x100 without a percent sign


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


@torch.no_grad()
def constrained_predictions(model, collator: VisionChatCollator, examples: list[dict], labels: list[str], batch_size: int) -> list[int]:
    """For each example, the index of the label whose reply the model finds most likely."""
    device = _device(model)
    flat = [
        {**_media(ex), "messages": prompt_of(ex["messages"]) + [{"role": "assistant", "content": [text_part(lab)]}]}
        for ex in examples
        for lab in labels
    ]
    scores = []
    for i in range(0, len(flat), batch_size):
        scores.append(sequence_logprobs(model, _to(collator(flat[i : i + batch_size]), device)).cpu())
    return torch.cat(scores).view(len(examples), len(labels)).argmax(-1).tolist()


@torch.no_grad()
def generate_answers(model, collator: VisionChatCollator, examples: list[dict], batch_size: int, max_new_tokens: int) -> list[str]:
    device = _device(model)
    tok = collator.processor.tokenizer
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        texts = [collator.render(prompt_of(ex["messages"]), add_generation_prompt=True) for ex in chunk]
        batch = _to(collator.encode(texts, [list(ex["images"]) for ex in chunk], padding_side="left", examples=chunk), device)
        gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out += tok.batch_decode(gen[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def _media(example: dict) -> dict:
    """An example's images, and its videos with their timing where it has any."""
    return {k: example[k] for k in ("images", "videos", "video_meta") if example.get(k) is not None}


def evaluate_classification(model, collator: VisionChatCollator, dataset, labels: list[str], modes: list[str],
                            batch_size: int = 32, max_new_tokens: int = 8, task: str = "classification") -> dict:
    """Accuracy of `model` on `dataset` (canonical chat examples whose final answer is one of `labels`), with a
    bootstrap 95% interval and, constrained, a confusion matrix; generated answers are also scored by the task's
    own metrics (evaluate/tasks.py: VQA accuracy, ChartQA's relaxed accuracy, ...)."""
    was_training = model.training
    eval_mode(model)
    examples = [dataset[i] for i in range(len(dataset))]
    gold = [final_answer(ex["messages"]) for ex in examples]
    gold_norm = [normalize(g) for g in gold]
    result: dict = {"n": len(examples), "labels": labels, "gold": gold}  # gold: per example, for the report's flips
    try:
        if "constrained" in modes:
            t0 = time.perf_counter()
            pred = constrained_predictions(model, collator, examples, labels, max(1, batch_size))
            correct = [normalize(labels[p]) == g for p, g in zip(pred, gold_norm)]
            result["constrained"] = {
                "accuracy": sum(correct) / len(correct),
                "ci95": bootstrap_ci(correct),
                "per_class": _per_class(gold, correct),
                "confusion": confusion_matrix(gold, [labels[p] for p in pred], labels),
                "predictions": [labels[p] for p in pred],
                "correct": correct,
                "seconds": round(time.perf_counter() - t0, 2),
            }
        if "generate" in modes:
            t0 = time.perf_counter()
            answers = generate_answers(model, collator, examples, batch_size, max_new_tokens)
            correct = [normalize(a) == g for a, g in zip(answers, gold_norm)]
            metrics = score_answers(task, answers, [[g] for g in gold])
            result["generate"] = {
                "accuracy": sum(correct) / len(correct),
                "ci95": bootstrap_ci(correct),
                "per_class": _per_class(gold, correct) if task == "classification" else None,
                "metrics": {k: {"value": v["value"], "ci95": v["ci95"], **({"note": v["note"]} if "note" in v else {})}
                            for k, v in metrics.items()},
                "answers": answers,
                "correct": correct,
                "samples": [{"gold": g, "generated": a} for g, a in list(zip(gold, answers))[:10]],
                "seconds": round(time.perf_counter() - t0, 2),
            }
    finally:
        model.train(was_training)
    return result


def eval_mode(model) -> None:
    """model.eval(), except bitsandbytes 4-bit layers on CPU stay in training mode: bitsandbytes 0.50 repacks their
    weights for a CPU inference kernel on the first eval-mode forward and keeps using that kernel in later training
    steps, which then fail. These layers behave the same in both modes otherwise (no dropout, no batch statistics).
    Only bitsandbytes' own class: PEFT's LoRA wrapper around it (also named Linear4bit) stays in eval mode, so its
    LoRA dropout is off like everywhere else in the model."""
    import bitsandbytes as bnb  # pinned; imported here so that evaluating an unquantized model does not load it

    model.eval()
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and m.weight.device.type == "cpu":
            m.train()


def _per_class(gold: list[str], correct: list[bool]) -> dict[str, float]:
    tally: dict[str, list[int]] = {}
    for g, c in zip(gold, correct):
        t = tally.setdefault(g, [0, 0])
        t[0] += int(c)
        t[1] += 1
    return {k: round(v[0] / v[1], 4) for k, v in sorted(tally.items())}


def evaluate_task(model, collator: VisionChatCollator, test_ds, labels: list[str] | None, eval_cfg, console, when: str,
                  task: str | None = None) -> dict:
    """The recipe's evaluation (eval section) with a console line: constrained and generated accuracy with a label
    set; without one (vqa, captions, chat) there is nothing to constrain to, so free generation only, scored by the
    task's metrics too (`task`: data.task)."""
    task = task or ("classification" if labels is not None else "chat")
    modes = [m for m in eval_cfg.modes if labels is not None or m == "generate"]
    if not modes:  # a recipe asking only for constrained scores on data without a label set
        modes = ["generate"]
    with console.status(f"evaluating {len(test_ds)} test examples {when} ({', '.join(modes)})"):
        res = evaluate_classification(model, collator, test_ds, labels or [], modes, eval_cfg.batch_size,
                                      eval_cfg.max_new_tokens, task)
    accs = "  ".join(f"{m}: {100 * res[m]['accuracy']:.1f}% [{100 * res[m]['ci95'][0]:.1f}, {100 * res[m]['ci95'][1]:.1f}]"
                     for m in modes if m in res)
    extra = ""
    if "generate" in res and task not in ("classification", "chat"):
        # rates as percentages; caption scores x100 as the COCO tables give them (CIDEr-D 1.2 reads 120.0)
        extra = "  " + "  ".join(f"{k}: {100 * v['value']:.1f}" + ("" if k in CAPTION_METRICS else "%")
                                 for k, v in res["generate"]["metrics"].items())
    console.print(f"accuracy {when}: {accs}{extra}")
    return res
