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
