"""`vlmfit report` and `vlmfit compare` (issue 16, item 5) on run directories as training writes them: the task
metrics table with intervals, caption scores x100 with the tokenizer note, runs side by side, clear errors."""

import pytest

from vlmfit.config import load_config
from vlmfit.evaluate.tasks import score_answers
from vlmfit.rundir import RunDir, RunSummary


def finished_run(tmp_path, name, answers, references, steps=10, loss=0.5):
    """A run directory with the files a finished caption run writes (eval results from the real scorers)."""
    cfg = load_config(base={"model": {"name": "tiny:qwen2_vl"}, "data": {"task": "caption"}, "method": "full",
                            "eval": {"modes": ["generate"]}, "output": {"dir": str(tmp_path), "name": name}})
    run = RunDir.create(cfg)
    for when, ans in (("before", ["nothing"] * len(references)), ("after", answers)):
        metrics = score_answers("caption", ans, references)
        run.write_eval(when, {"n": len(ans), "generate": {
            "accuracy": metrics["exact_match"]["value"], "ci95": metrics["exact_match"]["ci95"],
            "metrics": {k: {kk: v[kk] for kk in ("value", "ci95", "note") if kk in v} for k, v in metrics.items()}}})
    run.log_metrics({"step": 1, "loss": 1.0})
    run.log_metrics({"step": steps, "loss": loss})
    run.write_summary(RunSummary(method="full", steps=steps, train_seconds=12.0, final_loss=loss, trainable_params=10,
                                 total_params=10, train_examples=8, test_examples=len(references), weights="model/",
                                 label_method="markers"))
    return run


REFS = [["a red circle at the top left"], ["a blue square in the center"], ["a green triangle at the bottom right"]]


def test_report_rebuilds_report_md_with_task_metrics_and_intervals(vlmfit, tmp_path):
    run = finished_run(tmp_path, "good", [r[0] for r in REFS], REFS)
    code, out, err = vlmfit("report", run.path)
    assert code == 0, err
    text = (run.path / "report.md").read_text()
    # identical captions: CIDEr-D 10 (x100); a resample of one scene drawn three times has idf 0, so the interval
    # reaches 0: the corpus statistics are recomputed per resample
    assert "| cider_d | 0.0 [0.0, 0.0] | 1000.0 [0.0, 1000.0] |" in text
    assert "| exact_match | 0.0% [0.0, 0.0] | 100.0% [100.0, 100.0] |" in text
    assert "Java PTBTokenizer" in text and (run.path / "loss.png").is_file()


def test_compare_puts_runs_side_by_side(vlmfit, tmp_path):
    a = finished_run(tmp_path, "good", [r[0] for r in REFS], REFS, steps=20, loss=0.1)
    b = finished_run(tmp_path, "weak", ["a red square at the top left", "a blue square", "a cat"], REFS)
    code, out, err = vlmfit("compare", a.path, b.path, "--md")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("| run | model | method | steps | train s | final loss | generate accuracy | bleu4")
    good = next(line for line in lines if line.startswith("| good"))
    weak = next(line for line in lines if line.startswith("| weak"))
    assert "| 20 |" in good and "0.0 -> 1000.0" in good and "0.0% -> 100.0%" in good
    weak_cider = float(weak.split("|")[-2].split("->")[1])
    assert 0 < weak_cider < 1000


@pytest.mark.parametrize("cmd", ["report", "compare"])
def test_unfinished_or_missing_runs_are_one_clear_error(vlmfit, tmp_path, cmd):
    cfg = load_config(base={"model": {"name": "tiny:qwen2_vl"}, "output": {"dir": str(tmp_path), "name": "half"}})
    RunDir.create(cfg)
    code, _, err = vlmfit(cmd, tmp_path / "half")
    assert code == 2 and "has not finished" in " ".join(err.split()) and "Traceback" not in err
    code, _, err = vlmfit(cmd, tmp_path / "nope")
    assert code == 2 and "not a run directory" in " ".join(err.split())


@pytest.mark.slow  # a training run with evaluations (~20 s)
def test_evaluation_during_training_records_curves_and_the_best_step(vlmfit, tmp_path, digits):
    """eval.every_steps on a held-out part of train (the source has no validation split): an evaluation every 2
    steps in metrics.jsonl, the best step in the summary and the report, the validation examples out of training."""
    import json

    p = tmp_path / "r.yaml"
    p.write_text(f"""model: {{name: "tiny:qwen2_vl"}}
data: {{source: {digits}, eval_limit: 4}}
method: lora
train: {{max_steps: 4, batch_size: 2, logging_steps: 1, save_steps: 100}}
eval: {{before: false, after: false, modes: [constrained], every_steps: 2}}
output: {{dir: {tmp_path / 'runs'}, name: during}}
""")
    code, out, err = vlmfit("train", p)
    assert code == 0, err
    run = tmp_path / "runs" / "during"
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [e["step"] for e in evals] == [2, 4] and all("constrained accuracy" in e["eval"] for e in evals)
    summary = json.loads((run / "summary.json").read_text())
    values = {e["step"]: e["eval"]["constrained accuracy"] for e in evals}
    assert summary["best"]["step"] == max(values, key=lambda s: (values[s], -s))
    assert summary["train_examples"] == 16 - 2  # 0.1 of the 16 held out for validation
    assert f"best on the validation split: step {summary['best']['step']}" in (run / "report.md").read_text()


@pytest.mark.slow  # a training run and a browser: ~25 s, kept out of the fast suite's budget
def test_report_html_renders_in_a_headless_browser(vlmfit, tmp_path, digits):
    """report.html in Debian's chromium (through playwright): a screenshot, the page's sections, every image
    loaded (the loss curve and the flipped examples' digits, all inline), no console errors, no request leaving
    the page."""
    import shutil

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    p = tmp_path / "r.yaml"
    p.write_text(f"""model: {{name: "tiny:qwen2_vl"}}
data: {{source: {digits}}}
method: lora
train: {{max_steps: 8, batch_size: 2, lr: 5.0e-3, logging_steps: 1, save_steps: 100}}
eval: {{modes: [constrained]}}
output: {{dir: {tmp_path / 'runs'}, name: html}}
""")
    code, out, err = vlmfit("train", p)
    assert code == 0, err
    page_path = tmp_path / "runs" / "html" / "report.html"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        errors, requests = [], []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
        page.goto(page_path.as_uri())
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        heads = [h.inner_text() for h in page.query_selector_all("h2")]
        images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])")
        table = page.inner_text("table")
        browser.close()
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert heads[:3] == ["Training", "Before and after training (95% intervals)",
                         "Confusion matrix after training (rows: true, columns: predicted)"]
    assert "Accuracy per class (constrained)" in heads
    assert "constrained accuracy" in table
    flipped = [h for h in heads if h.startswith(("wrong to right", "right to wrong"))]
    assert flipped, heads  # 8 steps of LoRA at lr 5e-3 change some of the 8 test digits' answers
    assert images and images[0] == ["loss curve", True]
    assert all(ok for _, ok in images) and any(alt.startswith("test row") for alt, _ in images), images
    assert not errors and not requests, (errors, requests)


def test_flipped_video_examples_show_frames_and_the_question(tmp_path):
    """A video caption run's report.html: each flipped example shows a strip of its clip's frames (inline PNG) and
    the question asked; the accuracy table and caption scores are there."""
    import base64
    import io

    from PIL import Image

    from vlmfit.data.builtin import _motion
    from vlmfit.report import write_html

    test = _motion(train=2, test=3, seed=5)["test"]
    gold = [r["messages"][-1]["content"][0]["text"] for r in test]
    run = finished_run(tmp_path, "vid", gold, [[g] for g in gold])
    for when, answers in (("before", ["nothing"] * 3), ("after", [gold[0], "nothing", gold[2]])):
        ev = run.evals()[0 if when == "before" else 1]
        ev["gold"] = gold
        ev["generate"].update(answers=answers, correct=[a == g for a, g in zip(answers, gold)])
        run.write_eval(when, ev)
    html = write_html(run, test).read_text()
    assert html.count("<img alt='test row") == 2 and "wrong to right: 2 examples" in html
    assert "Describe the video." in html
    uri = html.split("<img alt='test row 0' src='")[1].split("'")[0]
    strip = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert strip.height == 56 and strip.width == 4 * 56 + 3 * 2  # four 56 px frames side by side


# -- one set of facts, two renderings (issue 28, item 7) ---------------------------------------------------------------


def zo_run(tmp_path, name="zo", records=3):
    """A CLIP prompt run as train/zo.py leaves it: evaluations with the constrained accuracy only (no intervals, no
    per-example answers), the forward-only history in the summary and metrics.jsonl."""
    cfg = load_config(base={"model": {"name": "tiny:clip", "dtype": "float32"}, "data": {"source": "builtin:mnist-noisy"},
                            "method": "zo", "zo": {"optimizer": "sharpzo", "eval_every": 500},
                            "output": {"dir": str(tmp_path), "name": name}})
    run = RunDir.create(cfg)
    history = [{"step": 500 * i, "forward_passes": 500 * i, "accuracy": 0.25 + 0.01 * i, "train_seconds": 1.5 * i,
                **({"stage": "cma-es", "loss": 2.0 - 0.1 * i} if i else {})} for i in range(records)]
    for record in history:
        run.log_metrics(record)
    for when, acc in (("before", 0.254), ("after", 0.401)):
        run.write_eval(when, {"n": 100, "labels": [str(i) for i in range(10)], "constrained": {"accuracy": acc}})
    used = history[-1]["forward_passes"]
    run.write_summary(RunSummary(method="zo", steps=used, train_seconds=16.0, final_loss=1.8, trainable_params=512,
                                 total_params=10**6, train_examples=160, test_examples=100, weights="prompt.safetensors",
                                 label_method="class names", zo={"optimizer": "sharpzo", "target": "prompt",
                                 "forward_passes": used, "history": history, "outliers_skipped": 3}))
    return run


def dpo_run(tmp_path, name="dpo", task=True):
    """A DPO run's directory: preference metrics on 4 held-out pairs (by kind of rejected reply) and, with labelled
    pairs, the task's constrained accuracy."""
    cfg = load_config(base={"model": {"name": "tiny:qwen2_vl"}, "method": "dpo",
                            "output": {"dir": str(tmp_path), "name": name}})
    run = RunDir.create(cfg)
    for when, acc in (("before", 0.5), ("after", 0.875)):
        pref = {"n": 4, "beta": 0.1, "reward_accuracy": acc, "reward_margin": 0.25 * acc, "policy_accuracy": 0.75,
                "policy_logp_margin": 1.5}
        pref["by_group"] = {"wrong digit": dict(pref), "empty": dict(pref)}
        scored = {"n": 4, "constrained": {"accuracy": acc / 2, "ci95": [0.0, acc]}} if task else None
        run.write_eval(when, {"preference": pref, "task": scored})
    run.log_metrics({"step": 1, "loss": 0.69})
    run.log_metrics({"step": 4, "loss": 0.4})
    run.write_summary(RunSummary(method="dpo", steps=4, train_seconds=3.0, final_loss=0.4, trainable_params=100,
                                 total_params=1000, train_examples=16, test_examples=4, weights="adapter/",
                                 label_method="markers", dpo={"tuning": "lora", "beta": 0.1, "loss_type": "sigmoid",
                                 "reference": "the base model (adapter off)", "start": "tiny:qwen2_vl",
                                 "pairs": "wrong digit, empty", "has_task": task}))
    return run


def both(run, test_ds=None):
    from vlmfit.report import plot_loss, write_html, write_report

    plot_loss(run)
    return write_report(run).read_text(), write_html(run, test_ds).read_text()


def text_of(html_fragment: str) -> str:
    """What a reader sees of an HTML fragment: tags dropped, entities decoded."""
    import html
    import re

    return html.unescape(re.sub(r"<[^>]+>", "", html_fragment))


def overview(md: str, page: str) -> tuple[list[str], list[str]]:
    """The facts list of each rendering, as text: report.md's first bullets (code spans unquoted), report.html's
    first list."""
    bullets = md.split("\n\n")[1].splitlines()
    items = page.split("<ul>", 1)[1].split("</ul>", 1)[0].split("</li>")[:-1]
    return [b.removeprefix("- ").replace("`", "") for b in bullets], [text_of(i) for i in items]


def test_a_zo_run_has_its_forward_only_section_in_both_reports(tmp_path):
    """A CLIP prompt run (no test split given, accuracy without intervals): report.html is written, and both pages
    carry the forward-only section with the same facts and history rows."""
    md, page = both(zo_run(tmp_path))
    assert "\n## Forward-only training\n" in md and "<h2>Forward-only training</h2>" in page
    for fact in ("sharpzo on prompt: 1,000 forward passes, 3 outlier estimates skipped",
                 "held-out accuracy every 500 forward passes (zo.eval_every): 3 evaluations, best 27.0% at 1,000"):
        assert fact in md and fact in text_of(page), fact
    assert "| 500 | cma-es | 1.9000 | 26.0% | 1.5 |" in md
    assert "<tr><td>500</td><td>cma-es</td><td>1.9000</td><td>26.0%</td><td>1.5</td></tr>" in page
    assert "| constrained | 25.4% | 40.1% |" in md
    assert "<td>constrained accuracy</td><td>25.4%</td><td>40.1%</td>" in page  # no interval recorded, none shown
    assert overview(md, page)[0] == overview(md, page)[1]


def test_a_long_zo_history_is_shown_evenly_spread_in_both(tmp_path):
    md, page = both(zo_run(tmp_path, records=30))
    note = "12 of 30 records shown; all of them in metrics.jsonl."
    assert note in md and note in page
    assert "| 0 | - | - | 25.0% | 0.0 |" in md and "| 14,500 | cma-es |" in md  # the first and the last always


@pytest.mark.parametrize("task", [True, False])
def test_a_dpo_run_has_its_preference_section_in_both_reports(tmp_path, task):
    md, page = both(dpo_run(tmp_path, task=task))
    assert "\n## Preference (4 held-out pairs)\n" in md and "<h2>Preference (4 held-out pairs)</h2>" in page
    rows = [("reward accuracy", "50.0%", "87.5%"), ("reward margin", "0.125", "0.219"),
            ("policy alone prefers chosen", "75.0%", "75.0%"), ("reward accuracy, rejected = wrong digit", "50.0%", "87.5%")]
    for name, before, after in rows:
        assert f"| {name} | {before} | {after} |" in md
        assert f"<tr><td>{name}</td><td>{before}</td><td>{after}</td></tr>" in page
    for fact in ("DPO (sigmoid, beta 0.1), lora tuning from tiny:qwen2_vl; pairs: wrong digit, empty",
                 "reference: the base model (adapter off)", "A tie counts half"):
        assert fact in md.replace("`", "") and fact in text_of(page), fact
    no_task = "No task metric: these pairs carry no labels to score against."
    assert (no_task in md) == (no_task in page) == (not task)
    if task:  # the task's accuracy of the labelled pairs, with its interval on the page
        assert "| constrained | 25.0% | 43.8% |" in md
        assert "<td>constrained accuracy</td><td>25.0% [0.0, 50.0]</td><td>43.8% [0.0, 87.5]</td>" in page
    assert overview(md, page)[0] == overview(md, page)[1]


def test_a_fact_changed_in_the_run_directory_changes_both_reports(tmp_path):
    """Both pages render one set of facts read from the run directory: edit summary.json and eval_after.json, and
    the new figures replace the old in report.md and report.html alike; the facts lists stay equal."""
    from dataclasses import replace

    run = finished_run(tmp_path, "edit", [r[0] for r in REFS], REFS)
    md, page = both(run)
    assert "final loss: 0.5000" in md and "final loss: 0.5000" in page
    assert overview(md, page)[0] == overview(md, page)[1]

    run.write_summary(replace(run.summary(), final_loss=0.125, tracking={"tensorboard": "tb/"},
                              divergence=[{"step": 3, "grad_norm": "nan", "action": "skip", "rows": [1, 2]}]))
    ev = run.evals()[1]
    ev["generate"]["metrics"]["bleu4"].update(value=0.333, ci95=[0.25, 0.5])
    run.write_eval("after", ev)
    new_md, new_page = both(run)
    for fact in ("final loss: 0.1250", "tracking: tensorboard at tb/", "step 3 skipped (gradient norm nan)"):
        assert fact in new_md.replace("`", "") and fact in text_of(new_page), fact
    assert "final loss: 0.5000" not in new_md and "final loss: 0.5000" not in new_page
    assert "| bleu4 | 0.0 [0.0, 0.0] | 33.3 [25.0, 50.0] |" in new_md
    assert "<td>bleu4</td><td>0.0 [0.0, 0.0]</td><td>33.3 [25.0, 50.0]</td>" in new_page
    assert overview(new_md, new_page)[0] == overview(new_md, new_page)[1]
