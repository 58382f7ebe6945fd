"""report.md and the loss curve of a run, read from its run directory (summary.json, eval_*.json, metrics.jsonl)."""

from __future__ import annotations

from pathlib import Path

from vlmfit.rundir import LOSS_PLOT, REPORT, RunDir, RunSummary


def plot_loss(run: RunDir) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = run.metrics()
    rows = [r for r in records if "loss" in r and "step" in r]
    evals = [r for r in records if "eval" in r]  # eval.every_steps: the validation metric at those steps
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 3.5), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="o", ms=2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (assistant tokens)")
    ax.set_title(run.path.name, fontsize=9)
    ax.grid(alpha=0.3)
    if evals:
        name = next(iter(evals[0]["eval"]))
        right = axes[0][1]
        right.plot([r["step"] for r in evals], [r["eval"][name] for r in evals], marker="o", ms=3, color="tab:green")
        right.set_xlabel("optimizer step")
        right.set_ylabel(f"validation {name}")
        right.grid(alpha=0.3)
    fig.tight_layout()
    out = run.path / LOSS_PLOT
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _acc(ev: dict | None, mode: str) -> str:
    if not ev or mode not in ev:
        return "-"
    return f"{100 * ev[mode]['accuracy']:.1f}%"


def _length_line(rep: dict | None) -> str:
    if rep is None:
        return "not applied (this method never truncates)"
    if rep.get("limit") is None:
        return "none (nothing truncated)"
    line = f"{rep['limit']} ({rep['policy']}); {rep['overlong']} examples longer, longest {rep['longest']} tokens"
    if rep.get("dropped"):
        line += f"; dropped {rep['dropped']} (rows and reasons in summary.json)"
    if rep.get("truncated"):
        line += f"; truncated {rep['truncated']} inside text"
    return line


def write_report(run: RunDir) -> Path:
    """report.md of a finished run: what trained, on what, and the task metrics before and after."""
    cfg, s = run.config(), run.summary()
    before, after = run.evals()
    if s.dpo is not None:  # DPO's evaluations hold preference metrics and, with labelled pairs, the task's
        pref_before, pref_after = before, after
        before, after = before and before["task"], after and after["task"]
    modes = [m for m in cfg.eval.modes if (before and m in before) or (after and m in after)]
    lines = [
        f"# Run {run.path.name}",
        "",
        f"- model: `{cfg.model.name}`  method: `{cfg.method}`  data: `{cfg.data.source}`",
        f"- trainable parameters: {s.trainable_params:,} of {s.total_params:,}",
        f"- steps: {s.steps}  train time: {s.train_seconds:.1f} s  final loss: {s.final_loss:.4f}",
        f"- training examples: {s.train_examples}  test examples: {s.test_examples}",
        f"- labels: {s.label_method} (loss on {cfg.train.loss_on} tokens)",
        f"- max_length: {_length_line(s.lengths)}",
    ]
    if s.best is not None:
        lines.append(f"- best on the validation split: step {s.best['step']} ({s.best['metric']} {s.best['value']:.4g}; "
                     f"{s.best['evaluations']} evaluations, eval.every_steps {cfg.eval.every_steps}; curve beside the loss)")
    if s.zo is not None:
        lines.append(f"- forward-only: {s.zo['optimizer']} on {s.zo['target']}, {s.zo['forward_passes']:,} forward passes"
                     + (f", {s.zo['outliers_skipped']} outlier estimates skipped" if s.zo["outliers_skipped"] else ""))
    lines += ["", "| accuracy | before | after |", "|---|---|---|"]
    lines += [f"| {m} | {_acc(before, m)} | {_acc(after, m)} |" for m in modes]
    lines += task_metric_lines(before, after)
    lines += ["", f"![loss]({LOSS_PLOT})", "", f"Weights: `{s.weights}`. Config: `config.yaml`. Environment: `environment.json`.", ""]
    if s.dpo is not None:
        lines.append(preference_section(s, pref_before, pref_after))
    out = run.path / REPORT
    out.write_text("\n".join(lines))
    return out


RATES = ("exact_match", "vqa_accuracy", "relaxed_accuracy")  # shares, shown as percentages; the rest (captions) x100


def _metric(ev: dict | None, name: str) -> str:
    m = ((ev or {}).get("generate") or {}).get("metrics", {}).get(name)
    if m is None:
        return "-"
    unit = "%" if name in RATES else ""
    lo, hi = m["ci95"]
    return f"{100 * m['value']:.1f}{unit} [{100 * lo:.1f}, {100 * hi:.1f}]"


def task_metric_lines(before: dict | None, after: dict | None) -> list[str]:
    """The generated answers' task metrics (VQA, ChartQA, captions), before and after, with their 95% intervals."""
    names = [n for ev in (before, after) for n in ((ev or {}).get("generate") or {}).get("metrics", {})]
    names = list(dict.fromkeys(names))
    if not names:
        return []
    lines = ["", "| task metric (generated answers, 95% interval) | before | after |", "|---|---|---|"]
    lines += [f"| {n} | {_metric(before, n)} | {_metric(after, n)} |" for n in names]
    notes = {m.get("note") for ev in (before, after) for m in ((ev or {}).get("generate") or {}).get("metrics", {}).values()}
    lines += [f"\nCaption scores x100 (COCO's convention); {note}." for note in sorted(n for n in notes if n)]
    return lines


def compare_table(runs: list[RunDir]) -> tuple[list[str], list[list[str]]]:
    """Runs side by side: what trained, how long, the final loss, and each metric after training (before, with an
    arrow, where the run evaluated both)."""
    cols = ["run", "model", "method", "steps", "train s", "final loss"]
    rows, metric_names = [], []
    evals = []
    for run in runs:
        before, after = run.evals()
        s = run.summary()
        if s.dpo is not None:
            before, after = before and before["task"], after and after["task"]
        evals.append((before, after))
        for ev in (before, after):
            for mode in ("constrained", "generate"):
                if ev and mode in ev and f"{mode} accuracy" not in metric_names:
                    metric_names.append(f"{mode} accuracy")
            for n in ((ev or {}).get("generate") or {}).get("metrics", {}):
                if n not in metric_names and n != "exact_match":
                    metric_names.append(n)
    for run, (before, after) in zip(runs, evals):
        cfg, s = run.config(), run.summary()
        row = [run.path.name, cfg.model.name, cfg.method, str(s.steps), f"{s.train_seconds:.0f}", f"{s.final_loss:.4f}"]
        for name in metric_names:
            if name.endswith(" accuracy"):
                mode = name.split()[0]
                a, b = _acc(after, mode), _acc(before, mode)
            else:
                a, b = _metric(after, name).split(" [")[0], _metric(before, name).split(" [")[0]
            row.append(f"{b} -> {a}" if b != "-" and a != "-" else a if a != "-" else b)
        rows.append(row)
    return cols + metric_names, rows


def _pct(ev: dict | None, key: str, group: str | None = None) -> str:
    if not ev:
        return "-"
    pref = ev["preference"] if group is None else ev["preference"]["by_group"][group]
    return f"{100 * pref[key]:.1f}%" if "accuracy" in key else f"{pref[key]:.3f}"


def preference_section(summary: RunSummary, before: dict | None, after: dict | None) -> str:
    d = summary.dpo
    has_task = d["has_task"]
    ev = after or before
    if ev is None:
        return "\n## Preference\n\nNot evaluated (eval.before and eval.after are off).\n"
    rows = [("reward accuracy", "reward_accuracy"), ("reward margin", "reward_margin"),
            ("policy alone prefers chosen", "policy_accuracy"), ("policy log-prob margin", "policy_logp_margin")]
    lines = ["", f"## Preference ({ev['preference']['n']} held-out pairs)", "",
             f"- DPO ({d['loss_type']}, beta {d['beta']}), {d['tuning']} tuning from `{d['start']}`; pairs: {d['pairs']}",
             f"- reference: {d['reference']}", "", "| metric | before | after |", "|---|---|---|"]
    lines += [f"| {name} | {_pct(before, key)} | {_pct(after, key)} |" for name, key in rows]
    for g in ev["preference"].get("by_group", {}):
        lines.append(f"| reward accuracy, rejected = {g} | {_pct(before, 'reward_accuracy', g)} | {_pct(after, 'reward_accuracy', g)} |")
    lines += ["", "Reward = beta * (log policy(reply) - log reference(reply)); accuracy = share of pairs whose chosen reply "
              "gets the higher reward. A tie counts half: before training the policy is the reference, every pair ties "
              "and the accuracy is 50% by construction. 'Policy alone' compares log policy(chosen) with log policy(rejected), "
              "without the reference.",
              "" if has_task else "\nNo task metric: these pairs carry no labels to score against.", ""]
    return "\n".join(lines)
