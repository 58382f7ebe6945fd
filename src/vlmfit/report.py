"""report.md, report.html and the loss curve of a run, read from its run directory (summary.json, eval_*.json,
metrics.jsonl), plus the test images for the examples that flipped."""

from __future__ import annotations

from pathlib import Path

from vlmfit.rundir import LOSS_PLOT, REPORT, REPORT_HTML, RunDir, RunSummary


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
    if s.tracking:
        lines.append("- tracking: " + "; ".join(f"{k} at `{v}`" for k, v in s.tracking.items()))
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


# -- report.html: one self-contained page (images inline, no script, no network) -------------------------------------

_CSS = """body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;color:#222}
table{border-collapse:collapse;margin:8px 0 18px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}h1{font-size:22px}h2{font-size:17px;margin-top:28px}
.flips{display:flex;flex-wrap:wrap;gap:10px}.flip{border:1px solid #ddd;padding:6px;width:200px;font-size:12px}
.flip img{max-width:188px;height:96px;object-fit:contain;image-rendering:pixelated;background:#000;display:block}
.good{color:#176d2c}.bad{color:#a3261b}.note{color:#666;font-size:12px}"""


def _esc(text) -> str:
    import html

    return html.escape(str(text))


def _png(path_or_image, size: int | None = None) -> str:
    """A data: URI of a PNG file or a PIL image (thumbnailed to `size`)."""
    import base64
    import io

    if isinstance(path_or_image, Path):
        data = path_or_image.read_bytes()
    else:
        img = path_or_image.convert("RGB")
        if size:
            img = img.copy()
            img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _answers(ev: dict | None) -> tuple[str, list[str], list[bool]] | None:
    """(mode, per-example answers, whether each was right) of an evaluation: constrained predictions when there
    are, else generated answers."""
    if not ev:
        return None
    for mode, key in (("constrained", "predictions"), ("generate", "answers")):
        if mode in ev and key in ev[mode] and "correct" in ev[mode]:
            return mode, ev[mode][key], ev[mode]["correct"]
    return None


def _rate(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _thumbnail(row: dict, size: int = 96):
    """A test row's picture for the report: its first image, or for a video up to four of its frames side by side
    (in time order), each `size` px high at most."""
    from PIL import Image

    if row.get("images"):
        img = row["images"][0].convert("RGB").copy()
        img.thumbnail((size, size))
        return img
    frames = ((row.get("videos") or [[]])[0])
    if not frames:
        return None
    pick = [frames[round(i * (len(frames) - 1) / 3)] for i in range(4)] if len(frames) > 4 else list(frames)
    tiles = []
    for f in pick:
        f = f.convert("RGB").copy()
        f.thumbnail((size, size))
        tiles.append(f)
    strip = Image.new("RGB", (sum(t.width for t in tiles) + 2 * (len(tiles) - 1), max(t.height for t in tiles)), "white")
    x = 0
    for t in tiles:
        strip.paste(t, (x, 0))
        x += t.width + 2
    return strip


def _question(row: dict) -> str:
    """The user's words in a test row (the question a VQA answer is judged against)."""
    users = [m for m in row.get("messages") or [] if m.get("role") == "user"]
    content = users[-1]["content"] if users else []
    return " ".join(p.get("text") or "" for p in content if p.get("type") == "text") if isinstance(content, list) else str(content)


def flips(before: dict | None, after: dict | None) -> dict[str, list[dict]]:
    """The test examples whose answer turned right or wrong with training (as the evaluation judged them)."""
    a, b = _answers(before), _answers(after)
    gold = (after or {}).get("gold") or (before or {}).get("gold")
    out: dict[str, list[dict]] = {"wrong to right": [], "right to wrong": []}
    if not a or not b or not gold or a[0] != b[0]:
        return out
    for i, (g, x, y, was, now) in enumerate(zip(gold, a[1], b[1], a[2], b[2])):
        if was != now:
            out["wrong to right" if now else "right to wrong"].append({"row": i, "gold": g, "before": x, "after": y})
    return out


def write_html(run: RunDir, test_ds=None, limit: int = 12) -> Path:
    """report.html: facts, loss and validation curves, accuracy and task metrics before / after with intervals, the
    confusion matrix, and the flipped examples with their images (when `test_ds`, the evaluated test split, is
    given: the same rows in the same order)."""
    cfg, s = run.config(), run.summary()
    before, after = run.evals()
    if s.dpo is not None:
        before, after = before and before["task"], after and after["task"]
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_esc(run.path.name)}</title>",
             f"<style>{_CSS}</style></head><body><h1>Run {_esc(run.path.name)}</h1><ul>",
             f"<li>model <code>{_esc(cfg.model.name)}</code>, method <code>{_esc(cfg.method)}</code>, data "
             f"<code>{_esc(cfg.data.source)}</code> ({_esc(cfg.data.task)})</li>",
             f"<li>{s.steps} steps, {s.train_seconds:.1f} s, final loss {s.final_loss:.4f}; trainable parameters "
             f"{s.trainable_params:,} of {s.total_params:,}</li>",
             f"<li>{s.train_examples} training and {s.test_examples} test examples</li>"]
    if s.best is not None:
        parts.append(f"<li>best on the validation split: step {s.best['step']} ({_esc(s.best['metric'])} "
                     f"{s.best['value']:.4g})</li>")
    if s.tracking:
        parts.append("<li>tracking: " + "; ".join(f"{_esc(k)} at <code>{_esc(v)}</code>" for k, v in s.tracking.items()) + "</li>")
    parts.append("</ul>")
    if (run.path / LOSS_PLOT).is_file():
        parts.append(f"<h2>Training</h2><img alt='loss curve' src='{_png(run.path / LOSS_PLOT)}' style='max-width:100%'>")
    rows = []
    for mode in ("constrained", "generate"):
        if (before and mode in before) or (after and mode in after):
            cells = []
            for ev in (before, after):
                m = (ev or {}).get(mode)
                cells.append(f"{100 * m['accuracy']:.1f}% [{100 * m['ci95'][0]:.1f}, {100 * m['ci95'][1]:.1f}]" if m else "-")
            rows.append((f"{mode} accuracy", *cells))
    names = list(dict.fromkeys(n for ev in (before, after) for n in ((ev or {}).get("generate") or {}).get("metrics", {})))
    rows += [(n, _metric(before, n), _metric(after, n)) for n in names]
    if rows:
        parts.append("<h2>Before and after training (95% intervals)</h2><table><tr><th>metric</th><th>before</th>"
                     "<th>after</th></tr>" + "".join(f"<tr><td>{_esc(a)}</td><td>{_esc(b)}</td><td>{_esc(c)}</td></tr>"
                                                     for a, b, c in rows) + "</table>")
    notes = {m.get("note") for ev in (before, after) for m in ((ev or {}).get("generate") or {}).get("metrics", {}).values()}
    parts += [f"<p class=note>Caption scores x100; {_esc(n)}.</p>" for n in sorted(x for x in notes if x)]
    conf = ((after or {}).get("constrained") or {}).get("confusion")
    if conf:
        top = max((c for row in conf["counts"] for c in row), default=1) or 1
        head = "".join(f"<th>{_esc(c)}</th>" for c in conf["columns"])
        body = "".join(
            f"<tr><th>{_esc(g)}</th>" + "".join(
                f"<td style='background:rgba(31,119,180,{c / top:.2f})'>{c}</td>" for c in row) + "</tr>"
            for g, row in zip(conf["labels"], conf["counts"]))
        parts.append(f"<h2>Confusion matrix after training (rows: true, columns: predicted)</h2><table><tr><th></th>"
                     f"{head}</tr>{body}</table>")
    per_class = [(mode, (before or {}).get(mode, {}).get("per_class") or {}, (after or {}).get(mode, {}).get("per_class") or {})
                 for mode in ("constrained", "generate")]
    per_class = [(m, b, a) for m, b, a in per_class if a or b]
    if per_class:
        mode, pb, pa = per_class[0]  # constrained when there is one: the label-set accuracy
        classes = sorted(set(pb) | set(pa))
        parts.append(f"<h2>Accuracy per class ({_esc(mode)})</h2><table><tr><th>class</th><th>before</th><th>after</th></tr>"
                     + "".join(f"<tr><td>{_esc(c)}</td><td>{_rate(pb.get(c))}</td><td>{_rate(pa.get(c))}</td></tr>"
                               for c in classes) + "</table>")
    changed = flips(before, after)
    if any(changed.values()):
        for kind, items in changed.items():
            cls = "good" if kind == "wrong to right" else "bad"
            parts.append(f"<h2 class={cls}>{_esc(kind)}: {len(items)} examples</h2><div class=flips>")
            for item in items[:limit]:
                img, question = "", ""
                if test_ds is not None and item["row"] < len(test_ds):
                    row = test_ds[item["row"]]
                    if (thumb := _thumbnail(row)) is not None:
                        img = f"<img alt='test row {item['row']}' src='{_png(thumb)}'>"
                    question = f"<div class=note>{_esc(_question(row))}</div>"
                parts.append(f"<div class=flip>{img}{question}<div>row {item['row']}: <b>{_esc(item['gold'])}</b></div>"
                             f"<div>before: {_esc(item['before'])}</div><div class={cls}>after: {_esc(item['after'])}</div></div>")
            parts.append("</div>")
    parts.append("</body></html>\n")
    out = run.path / REPORT_HTML
    out.write_text("".join(parts))
    return out
