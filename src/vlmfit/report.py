"""report.md, report.html and the loss curve of a run. `report_facts` reads the run directory once (summary, recipe,
evaluations) into ReportFacts; `write_report` and `write_html` render those same facts: the markdown as the summary,
the HTML with the pictures too (curves, confusion matrix, accuracy per class, flipped examples)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vlmfit.rundir import CONFIG, ENVIRONMENT, LOSS_PLOT, METRICS, REPORT, REPORT_HTML, SUMMARY, RunDir, RunSummary

RATES = ("exact_match", "vqa_accuracy", "relaxed_accuracy")  # shares, shown as percentages; the rest (captions) x100
MODES = ("constrained", "generate")
ZO_ROWS = 12  # forward-only evaluations shown (evenly spread, the first and last always); all are in METRICS


@dataclass(frozen=True)
class Code:
    """A literal inside a fact (a model name, a path): `text` in markdown, <code>text</code> in HTML."""

    text: str


Line = tuple  # one fact: str and Code parts, rendered the same way by both formats


@dataclass
class Section:
    """A titled part of the report: fact lines, a table (`head`, `rows`), then notes."""

    title: str
    lines: list[Line] = field(default_factory=list)
    head: tuple[str, ...] = ()
    rows: list[tuple[str, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class ReportFacts:
    """Everything report.md and report.html say about a run, read once from its run directory."""

    name: str
    model: str
    method: str
    summary: RunSummary
    before: dict | None  # the task's evaluations (DPO: the task part of them; None without labelled pairs)
    after: dict | None
    overview: list[Line]  # what trained, on what, for how long, with which labels, lengths, best step, tracking
    accuracy: list[tuple[str, dict | None, dict | None]]  # (mode, its result before, after) of every evaluated mode
    task_metrics: list[tuple[str, str, str]]  # (name, before, after) of the generated answers, with 95% intervals
    metric_notes: list[str]  # how caption scores are scaled and tokenized
    methods: list[Section]  # the method's own facts: zo's forward-only training, DPO's preference metrics
    footer: Line  # where the weights, the recipe and the environment are
    loss_plot: Path | None
    confusion: dict | None  # after training, constrained predictions
    per_class: tuple[str, dict, dict] | None  # (mode, before, after): accuracy per class
    flipped: dict[str, list[dict]]  # "wrong to right" / "right to wrong": test rows (with picture and question)
    samples: list[dict] = field(default_factory=list)  # GRPO: the last rollout batch's completions and rewards


def report_facts(run: RunDir, test_ds=None, examples: int = 12) -> ReportFacts:
    """The facts of a finished run. `test_ds`, the evaluated test split (the same rows in the same order), adds
    the picture and the question of the first `examples` flipped examples of each kind."""
    cfg, s = run.config(), run.summary()
    before, after = run.evals()
    methods = []
    if s.zo is not None:
        methods.append(_zo_section(s.zo, cfg.zo.eval_every))
    if s.grpo is not None:
        methods.append(_grpo_section(s.grpo, run.metrics()))
    if s.dpo is not None:  # DPO's evaluations hold preference metrics and, with labelled pairs, the task's
        methods.append(_preference_section(s.dpo, before, after))
        before, after = before and before["task"], after and after["task"]
    modes = [m for m in dict.fromkeys([*cfg.eval.modes, *MODES]) if (before and m in before) or (after and m in after)]
    task_rows, task_notes = _task_facts(before, after)
    return ReportFacts(
        name=run.path.name, model=cfg.model.name, method=cfg.method, summary=s, before=before, after=after,
        overview=_overview(cfg, s), accuracy=[(m, (before or {}).get(m), (after or {}).get(m)) for m in modes],
        task_metrics=task_rows, metric_notes=task_notes, methods=methods,
        footer=("Weights: ", Code(s.weights), ". Config: ", Code(CONFIG), ". Environment: ", Code(ENVIRONMENT), "."),
        loss_plot=run.path / LOSS_PLOT if (run.path / LOSS_PLOT).is_file() else None,
        confusion=((after or {}).get("constrained") or {}).get("confusion"), per_class=_per_class(before, after),
        flipped=_with_rows(flips(before, after), test_ds, examples), samples=run.samples(),
    )  # fmt: skip


def _overview(cfg, s: RunSummary) -> list[Line]:
    lines = [
        ("model: ", Code(cfg.model.name), "  method: ", Code(cfg.method), "  data: ", Code(cfg.data.source)),
        (f"trainable parameters: {s.trainable_params:,} of {s.total_params:,}",),
        (f"steps: {s.steps}  train time: {s.train_seconds:.1f} s  final loss: {s.final_loss:.4f}",),
        (f"training examples: {s.train_examples}  test examples: {s.test_examples}",),
        (f"labels: {s.label_method} (loss on {cfg.train.loss_on} tokens)",),
        (f"max_length: {_length_line(s.lengths)}",),
    ]
    if s.best is not None:
        lines.append((f"best on the validation split: step {s.best['step']} ({s.best['metric']} {s.best['value']:.4g}; "
                      f"{s.best['evaluations']} evaluations, eval.every_steps {cfg.eval.every_steps}; curve beside the loss)",))
    if s.divergence:
        lines.append(_divergence_line(s.divergence))
    if s.tracking:
        parts = [p for k, v in s.tracking.items() for p in ("; ", f"{k} at ", Code(v))]
        lines.append(("tracking: ", *parts[1:]))
    return lines


def _length_line(rep: dict | None) -> str:
    if rep is None:
        return "not applied (this method never truncates)"
    if rep.get("limit") is None:
        return "none (nothing truncated)"
    line = f"{rep['limit']} ({rep['policy']}); {rep['overlong']} examples longer, longest {rep['longest']} tokens"
    if rep.get("dropped"):
        line += f"; dropped {rep['dropped']} (rows and reasons in {SUMMARY})"
    if rep.get("truncated"):
        line += f"; truncated {rep['truncated']} inside text"
    return line


def _divergence_line(events: list[dict]) -> Line:
    """The steps the divergence guard dropped (train.on_divergence: skip) or stopped at, with their gradient norm."""
    steps = ", ".join(f"step {e['step']} {'stopped the run' if e['action'] == 'stop' else 'skipped'} (gradient norm "
                      + (f"{e['grad_norm']:.4g}" if isinstance(e["grad_norm"], float) else e["grad_norm"]) + ")"
                      for e in events)  # a float, or "nan" / "inf" as the guard wrote it
    return (f"divergence guard: {steps}; the rows of each step in {SUMMARY} and {METRICS}",)


def _zo_section(zo: dict, eval_every: int) -> Section:
    """Forward-only training: the optimizer, what it tuned, the forward passes spent, and the held-out accuracy
    along the way (zo's history, one record per zo.eval_every forward passes)."""
    history = zo["history"]
    lines = [(f"{zo['optimizer']} on {zo['target']}: {zo['forward_passes']:,} forward passes"
              + (f", {zo['outliers_skipped']} outlier estimates skipped" if zo["outliers_skipped"] else ""),)]
    evaluated = [r for r in history if r["accuracy"] is not None]
    if evaluated:
        best = max(evaluated, key=lambda r: (r["accuracy"], -r["forward_passes"]))
        lines.append((f"held-out accuracy every {eval_every:,} forward passes (zo.eval_every): {len(evaluated)} "
                      f"evaluations, best {_rate(best['accuracy'])} at {best['forward_passes']:,} forward passes",))
    shown = _spread(history, ZO_ROWS)
    rows = [(f"{r['forward_passes']:,}", r.get("stage") or "-", f"{r['loss']:.4f}" if "loss" in r else "-",
             _rate(r["accuracy"]), f"{r['train_seconds']:.1f}") for r in shown]
    notes = [f"{len(shown)} of {len(history)} records shown; all of them in {METRICS}."] if len(shown) < len(history) else []
    return Section("Forward-only training", lines, ("forward passes", "stage", "training loss", "held-out accuracy",
                                                    "train s"), rows, notes)


def _grpo_section(g: dict, records: list[dict]) -> Section:
    """Reward optimisation: what was rewarded and against which reference, how images were encoded, and the rewards,
    completion length, clip ratio and KL along training (TRL's logged means, a spread of the logged steps)."""
    rewards = ", ".join(f"{r['name']} ({r['fn']}) x {r['weight']:g}" for r in g["rewards"])
    lines = [(f"{g['num_generations']} completions per prompt, loss {g['loss_type']}, importance sampling "
              f"{g['importance_sampling']}, beta {g['beta']:g}; rewards: {rewards}",),
             (f"reference: {g['reference']}",), (f"vision: {g['vision']}",)]
    if g.get("vision_images"):
        v = g["vision_images"]
        lines.append((f"images the forwards asked for: {v['asked']:,}; encoded by the vision tower: {v['encoded']:,}",))
    names = [r["name"] for r in g["rewards"]]
    logged = [r for r in records if "reward" in r and "step" in r]
    shown = _spread(logged, ZO_ROWS)
    cols = [f"rewards/{n}/mean" for n in names]
    rows = [(str(r["step"]), *(f"{r.get(c, float('nan')):.3f}" for c in cols), f"{r['reward']:.3f}",
             f"{r.get('frac_reward_zero_std', float('nan')):.2f}", f"{r.get('completions/mean_length', float('nan')):.1f}",
             f"{r.get('clip_ratio/region_mean', 0.0):.3f}", f"{r['kl']:.4f}" if "kl" in r else "-") for r in shown]
    notes = [f"{len(shown)} of {len(logged)} logged steps shown; all of them in {METRICS}."] if len(shown) < len(logged) else []
    return Section("Reward optimisation (GRPO)", lines, ("step", *names, "total", "groups without spread",
                                                         "completion tokens", "clipped", "KL"), rows, notes)


def _spread(items: list, k: int) -> list:
    """At most k of `items`, evenly spread, the first and the last always among them."""
    if len(items) <= k:
        return list(items)
    return [items[i] for i in sorted({round(j * (len(items) - 1) / (k - 1)) for j in range(k)})]


def _pct(ev: dict | None, key: str, group: str | None = None) -> str:
    if not ev:
        return "-"
    pref = ev["preference"] if group is None else ev["preference"]["by_group"][group]
    return f"{100 * pref[key]:.1f}%" if "accuracy" in key else f"{pref[key]:.3f}"


PREFERENCE_ROWS = (("reward accuracy", "reward_accuracy"), ("reward margin", "reward_margin"),
                   ("policy alone prefers chosen", "policy_accuracy"), ("policy log-prob margin", "policy_logp_margin"))
PREFERENCE_NOTE = ("Reward = beta * (log policy(reply) - log reference(reply)); accuracy = share of pairs whose chosen "
                   "reply gets the higher reward. A tie counts half: before training the policy is the reference, every "
                   "pair ties and the accuracy is 50% by construction. 'Policy alone' compares log policy(chosen) with "
                   "log policy(rejected), without the reference.")


def _preference_section(d: dict, before: dict | None, after: dict | None) -> Section:
    """DPO: its settings, and the preference metrics on the held-out pairs before and after (per kind of rejected
    reply when the pairs have kinds)."""
    lines = [(f"DPO ({d['loss_type']}, beta {d['beta']}), {d['tuning']} tuning from ", Code(d["start"]),
              f"; pairs: {d['pairs']}"), (f"reference: {d['reference']}",)]
    ev = after or before
    if ev is None:
        return Section("Preference", lines, notes=["Not evaluated (eval.before and eval.after are off)."])
    rows = [(name, _pct(before, key), _pct(after, key)) for name, key in PREFERENCE_ROWS]
    rows += [(f"reward accuracy, rejected = {g}", _pct(before, "reward_accuracy", g), _pct(after, "reward_accuracy", g))
             for g in ev["preference"].get("by_group", {})]
    notes = [PREFERENCE_NOTE] + ([] if d["has_task"] else ["No task metric: these pairs carry no labels to score against."])
    return Section(f"Preference ({ev['preference']['n']} held-out pairs)", lines, ("metric", "before", "after"), rows, notes)


def _task_metrics(ev: dict | None) -> dict:
    return ((ev or {}).get("generate") or {}).get("metrics", {})


def _task_facts(before: dict | None, after: dict | None) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(name, before, after) of each task metric of the generated answers, and the notes on how they are scored."""
    names = list(dict.fromkeys(n for ev in (before, after) for n in _task_metrics(ev)))
    notes = {m.get("note") for ev in (before, after) for m in _task_metrics(ev).values()}
    return ([(n, _metric(before, n), _metric(after, n)) for n in names],
            [f"Caption scores x100 (COCO's convention); {note}." for note in sorted(n for n in notes if n)])


def _metric(ev: dict | None, name: str) -> str:
    m = _task_metrics(ev).get(name)
    if m is None:
        return "-"
    unit = "%" if name in RATES else ""
    lo, hi = m["ci95"]
    return f"{100 * m['value']:.1f}{unit} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _accuracy(m: dict | None, interval: bool = False) -> str:
    """One mode's accuracy, with its 95% interval when asked and recorded (a CLIP prompt run records none)."""
    if not m:
        return "-"
    text = f"{100 * m['accuracy']:.1f}%"
    if interval and "ci95" in m:
        text += f" [{100 * m['ci95'][0]:.1f}, {100 * m['ci95'][1]:.1f}]"
    return text


def _acc(ev: dict | None, mode: str) -> str:
    return _accuracy((ev or {}).get(mode))


def _rate(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _per_class(before: dict | None, after: dict | None) -> tuple[str, dict, dict] | None:
    """Accuracy per class before and after: constrained when there is one (the label-set accuracy), else generate."""
    for mode in MODES:
        pb, pa = ((ev or {}).get(mode, {}).get("per_class") or {} for ev in (before, after))
        if pa or pb:
            return mode, pb, pa
    return None


def _answers(ev: dict | None) -> tuple[str, list[str], list[bool]] | None:
    """(mode, per-example answers, whether each was right) of an evaluation: constrained predictions when there
    are, else generated answers."""
    if not ev:
        return None
    for mode, key in (("constrained", "predictions"), ("generate", "answers")):
        if mode in ev and key in ev[mode] and "correct" in ev[mode]:
            return mode, ev[mode][key], ev[mode]["correct"]
    return None


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


def _with_rows(changed: dict[str, list[dict]], test_ds, examples: int) -> dict[str, list[dict]]:
    """The first `examples` flipped examples of each kind with their test row's picture and question."""
    if test_ds is None:
        return changed
    for items in changed.values():
        for item in items[:examples]:
            if item["row"] < len(test_ds):
                row = test_ds[item["row"]]
                item.update(picture=_thumbnail(row), question=_question(row))
    return changed


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


# -- report.md -------------------------------------------------------------------------------------------------------


def write_report(run: RunDir) -> Path:
    """report.md of a finished run: what trained, on what, the task metrics before and after, the method's own."""
    f = report_facts(run)
    lines = [f"# Run {f.name}", "", *("- " + _md(line) for line in f.overview)]
    lines += ["", "| accuracy | before | after |", "|---|---|---|"]
    lines += [f"| {mode} | {_accuracy(b)} | {_accuracy(a)} |" for mode, b, a in f.accuracy]
    lines += _task_md(f.task_metrics, f.metric_notes)
    lines += ["", f"![loss]({LOSS_PLOT})", "", _md(f.footer), ""]
    lines += [_md_section(section) for section in f.methods]
    if f.samples:
        names = list(f.samples[0]["rewards"])
        lines += ["", f"Sampled completions of the last rollout batch (step {f.samples[0].get('step')}):", "",
                  "| train row | answer | completion | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
        lines += [f"| {s['row']} | {s['answer']} | {' '.join(s['completion'].replace('|', '/').split()) or '(empty)'} | "
                  + " | ".join(f"{s['rewards'][n]:g}" for n in names) + " |" for s in f.samples]
    out = run.path / REPORT
    out.write_text("\n".join(lines))
    return out


def _md(line: Line) -> str:
    return "".join(f"`{p.text}`" if isinstance(p, Code) else p for p in line)


def _md_section(s: Section) -> str:
    blocks = [f"## {s.title}"]
    if s.lines:
        blocks.append("\n".join("- " + _md(line) for line in s.lines))
    if s.head:
        blocks.append("\n".join(["| " + " | ".join(s.head) + " |", "|" + "---|" * len(s.head)]
                                + ["| " + " | ".join(r) + " |" for r in s.rows]))
    return "\n" + "\n\n".join(blocks + s.notes) + "\n"


def task_metric_lines(before: dict | None, after: dict | None) -> list[str]:
    """The generated answers' task metrics (VQA, ChartQA, captions), before and after, with their 95% intervals."""
    return _task_md(*_task_facts(before, after))


def _task_md(rows: list[tuple[str, str, str]], notes: list[str]) -> list[str]:
    if not rows:
        return []
    lines = ["", "| task metric (generated answers, 95% interval) | before | after |", "|---|---|---|"]
    lines += [f"| {n} | {b} | {a} |" for n, b, a in rows]
    return lines + [f"\n{note}" for note in notes]


def plot_loss(run: RunDir) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = run.metrics()
    rows = [r for r in records if "loss" in r and "step" in r]
    evals = [r for r in records if "eval" in r]  # eval.every_steps: the validation metric at those steps
    rewarded = [r for r in records if "reward" in r and "step" in r]  # GRPO: the rewards per function
    fig, axes = plt.subplots(1, 2 if evals or rewarded else 1, figsize=(11 if evals or rewarded else 6, 3.5), squeeze=False)
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
    elif rewarded:
        right = axes[0][1]
        for key in sorted({k for r in rewarded for k in r if k.startswith("rewards/") and k.endswith("/mean")}):
            right.plot([r["step"] for r in rewarded], [r.get(key) for r in rewarded], marker="o", ms=2,
                       label=key.removeprefix("rewards/").removesuffix("/mean"))
        right.plot([r["step"] for r in rewarded], [r["reward"] for r in rewarded], color="black", lw=1, label="total")
        right.set_xlabel("optimizer step")
        right.set_ylabel("mean reward per completion")
        right.legend(fontsize=8)
        right.grid(alpha=0.3)
    fig.tight_layout()
    out = run.path / LOSS_PLOT
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def compare_table(runs: list[RunDir]) -> tuple[list[str], list[list[str]]]:
    """Runs side by side: what trained, how long, the final loss, and each metric after training (before, with an
    arrow, where the run evaluated both)."""
    cols = ["run", "model", "method", "steps", "train s", "final loss"]
    facts = [report_facts(run) for run in runs]
    metric_names = []
    for f in facts:
        for ev in (f.before, f.after):
            for mode in MODES:
                if ev and mode in ev and f"{mode} accuracy" not in metric_names:
                    metric_names.append(f"{mode} accuracy")
            for n in _task_metrics(ev):
                if n not in metric_names and n != "exact_match":
                    metric_names.append(n)
    rows = []
    for f in facts:
        s = f.summary
        row = [f.name, f.model, f.method, str(s.steps), f"{s.train_seconds:.0f}", f"{s.final_loss:.4f}"]
        for name in metric_names:
            if name.endswith(" accuracy"):
                mode = name.split()[0]
                a, b = _acc(f.after, mode), _acc(f.before, mode)
            else:
                a, b = _metric(f.after, name).split(" [")[0], _metric(f.before, name).split(" [")[0]
            row.append(f"{b} -> {a}" if b != "-" and a != "-" else a if a != "-" else b)
        rows.append(row)
    return cols + metric_names, rows


# -- report.html: one self-contained page (images inline, no script, no network) -------------------------------------

_CSS = """body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;color:#222}
table{border-collapse:collapse;margin:8px 0 18px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}h1{font-size:22px}h2{font-size:17px;margin-top:28px}
.flips{display:flex;flex-wrap:wrap;gap:10px}.flip{border:1px solid #ddd;padding:6px;width:200px;font-size:12px}
.flip img{max-width:188px;height:96px;object-fit:contain;image-rendering:pixelated;background:#000;display:block}
.good{color:#176d2c}.bad{color:#a3261b}.note{color:#666;font-size:12px}"""


def write_html(run: RunDir, test_ds=None, limit: int = 12) -> Path:
    """report.html: the facts of report.md with the loss and validation curves, accuracy with its intervals, the
    confusion matrix, accuracy per class, and the flipped examples with their images (when `test_ds`, the
    evaluated test split, is given: the same rows in the same order), at most `limit` of each kind."""
    f = report_facts(run, test_ds, examples=limit)
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_esc(f.name)}</title>",
             f"<style>{_CSS}</style></head><body><h1>Run {_esc(f.name)}</h1>", _html_list(f.overview)]
    if f.loss_plot is not None:
        parts.append(f"<h2>Training</h2><img alt='loss curve' src='{_png(f.loss_plot)}' style='max-width:100%'>")
    rows = [(f"{mode} accuracy", _accuracy(b, interval=True), _accuracy(a, interval=True)) for mode, b, a in f.accuracy]
    rows += f.task_metrics
    if rows:
        intervals = f.task_metrics or any("ci95" in m for _, b, a in f.accuracy for m in (b, a) if m)
        parts.append(f"<h2>Before and after training{' (95% intervals)' if intervals else ''}</h2>"
                     + _html_table(("metric", "before", "after"), rows))
    parts += [f"<p class=note>{_esc(n)}</p>" for n in f.metric_notes]
    parts += [_html_section(section) for section in f.methods]
    if f.confusion:
        parts.append(_html_confusion(f.confusion))
    if f.per_class:
        mode, pb, pa = f.per_class
        parts.append(f"<h2>Accuracy per class ({_esc(mode)})</h2>" + _html_table(
            ("class", "before", "after"), [(c, _rate(pb.get(c)), _rate(pa.get(c))) for c in sorted(set(pb) | set(pa))]))
    if any(f.flipped.values()):
        parts += [_html_flips(kind, items, limit) for kind, items in f.flipped.items()]
    if f.samples:
        parts.append(_html_samples(run, f.samples))
    parts.append(f"<p>{_html(f.footer)}</p></body></html>\n")
    out = run.path / REPORT_HTML
    out.write_text("".join(parts))
    return out


def _esc(text) -> str:
    import html

    return html.escape(str(text))


def _html(line: Line) -> str:
    return "".join(f"<code>{_esc(p.text)}</code>" if isinstance(p, Code) else _esc(p) for p in line)


def _html_list(lines: list[Line]) -> str:
    return "<ul>" + "".join(f"<li>{_html(line)}</li>" for line in lines) + "</ul>"


def _html_table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    return ("<table><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


def _html_section(s: Section) -> str:
    return (f"<h2>{_esc(s.title)}</h2>" + (_html_list(s.lines) if s.lines else "")
            + (_html_table(s.head, s.rows) if s.head else "") + "".join(f"<p class=note>{_esc(n)}</p>" for n in s.notes))


def _html_confusion(conf: dict) -> str:
    top = max((c for row in conf["counts"] for c in row), default=1) or 1
    head = "".join(f"<th>{_esc(c)}</th>" for c in conf["columns"])
    body = "".join(
        f"<tr><th>{_esc(g)}</th>" + "".join(
            f"<td style='background:rgba(31,119,180,{c / top:.2f})'>{c}</td>" for c in row) + "</tr>"
        for g, row in zip(conf["labels"], conf["counts"]))
    return (f"<h2>Confusion matrix after training (rows: true, columns: predicted)</h2><table><tr><th></th>"
            f"{head}</tr>{body}</table>")


def _html_flips(kind: str, items: list[dict], limit: int) -> str:
    cls = "good" if kind == "wrong to right" else "bad"
    parts = [f"<h2 class={cls}>{_esc(kind)}: {len(items)} examples</h2><div class=flips>"]
    for item in items[:limit]:
        img = f"<img alt='test row {item['row']}' src='{_png(item['picture'])}'>" if item.get("picture") is not None else ""
        question = f"<div class=note>{_esc(item['question'])}</div>" if "question" in item else ""
        parts.append(f"<div class=flip>{img}{question}<div>row {item['row']}: <b>{_esc(item['gold'])}</b></div>"
                     f"<div>before: {_esc(item['before'])}</div><div class={cls}>after: {_esc(item['after'])}</div></div>")
    return "".join(parts) + "</div>"


def _html_samples(run: RunDir, samples: list[dict]) -> str:
    """GRPO's last rollout batch: each completion beside its prompt's image, the reference answer and its rewards."""
    parts = [f"<h2>Sampled completions (step {samples[0].get('step')}, the last rollout batch)</h2><div class=flips>"]
    for s in samples:
        img = f"<img alt='train row {s['row']}' src='{_png(run.path / s['image'])}'>" if s.get("image") else ""
        rewards = ", ".join(f"{n} {v:g}" for n, v in s["rewards"].items())
        good = "good" if sum(s["rewards"].values()) > 0 else "bad"
        parts.append(f"<div class=flip>{img}<div>row {s['row']}: <b>{_esc(s['answer'])}</b></div>"
                     f"<div class={good}>{_esc(s['completion']) or '(empty)'}</div><div class=note>{_esc(rewards)}</div></div>")
    return "".join(parts) + "</div>"


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
