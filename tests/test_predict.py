"""Issue 16 (first part): task metrics with bootstrap intervals (VQA accuracy, ChartQA's relaxed accuracy, exact
match, a confusion matrix) and `vlmfit predict` on images, data sources, runs and exports."""

import json

import pytest
from rich.console import Console

from vlmfit.evaluate.tasks import (bootstrap_ci, confusion_matrix, exact_match, relaxed_accuracy, score_answers,
                                   vqa_accuracy, vqa_normalize)

from helpers import digit_image, sample_video_files


def flat(text: str) -> str:
    return " ".join(text.split())


def test_vqa_normalisation_and_accuracy():
    assert vqa_normalize("The Two dogs.") == "2 dogs" and vqa_normalize("1,000") == "1000" and vqa_normalize("3.5") == "3.5"
    assert vqa_accuracy("two", ["2"]) == 1.0 and vqa_accuracy("a cat", ["cat"]) == 1.0 and vqa_accuracy("dog", ["cat"]) == 0.0
    # ten annotators, two said "red": each leave-one-out subset gives min(1, matches / 3)
    refs = ["red", "red"] + ["blue"] * 8
    assert vqa_accuracy("red", refs) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("blue", refs) == 1.0
    assert exact_match("Four!", ["four"]) == 1.0 and exact_match("4", ["four"]) == 0.0


@pytest.mark.parametrize("pred, ref, ok", [("10.4", "10", 1), ("10.6", "10", 0), ("9.5", "10", 1), ("12%", "12", 1),
                                           ("1,200", "1200", 1), ("0", "0", 1), ("0.01", "0", 0), ("Yes", "yes", 1),
                                           ("blue", "red", 0), ("ten", "10", 0)])
def test_chartqa_relaxed_accuracy(pred, ref, ok):
    assert relaxed_accuracy(pred, [ref]) == ok


def test_bootstrap_interval_holds_the_mean_and_narrows_with_more_examples():
    small = [1, 0] * 10
    large = [1, 0] * 500
    lo, hi = bootstrap_ci(small)
    assert lo < 0.5 < hi
    lo2, hi2 = bootstrap_ci(large)
    assert lo2 < 0.5 < hi2 and (hi2 - lo2) < (hi - lo) / 4
    assert bootstrap_ci([1, 1, 1]) == [1.0, 1.0]


def test_score_answers_and_confusion_matrix():
    res = score_answers("vqa", ["2", "the cat", "10.3"], [["two"], ["cat"], ["10"]])
    assert res["exact_match"]["value"] == 0.0 and res["vqa_accuracy"]["value"] == pytest.approx(2 / 3, abs=1e-4)
    assert res["relaxed_accuracy"]["value"] == pytest.approx(1 / 3, abs=1e-4) and len(res["relaxed_accuracy"]["ci95"]) == 2
    cm = confusion_matrix(["a", "a", "b"], ["a", "b", "zz"], ["a", "b"])
    assert cm["columns"] == ["a", "b", "other"] and cm["counts"] == [[1, 1, 0], [0, 0, 1]]


def test_evaluation_of_a_vqa_task_reports_its_metrics_with_intervals(digits, tmp_path):
    import datasets

    from vlmfit.chat.collate import VisionChatCollator
    from vlmfit.config import load_config
    from vlmfit.evaluate.classification import evaluate_task
    from vlmfit.models.load import load

    cfg = load_config(base={"model": {"name": "tiny:qwen2_vl"}}, overrides=["eval.max_new_tokens=3"])
    loaded = load("tiny:qwen2_vl")
    test = datasets.load_from_disk(str(digits))["test"].select(range(6))
    res = evaluate_task(loaded.model, VisionChatCollator(loaded.processor, loaded.family), test, None, cfg.eval,
                        Console(quiet=True), "now", task="vqa")
    gen = res["generate"]
    assert set(gen["metrics"]) == {"exact_match", "vqa_accuracy", "relaxed_accuracy"} and len(gen["answers"]) == 6
    assert all(len(v["ci95"]) == 2 for v in gen["metrics"].values()) and len(gen["ci95"]) == 2
    res = evaluate_task(loaded.model, VisionChatCollator(loaded.processor, loaded.family), test, [str(w) for w in
                        ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")], cfg.eval,
                        Console(quiet=True), "now")
    cm = res["constrained"]["confusion"]
    assert sum(map(sum, cm["counts"])) == 6 and res["constrained"]["ci95"][0] <= res["constrained"]["accuracy"] <= res["constrained"]["ci95"][1]


def test_predict_on_images_a_data_source_and_a_run(vlmfit, digits, tmp_path):
    for i in range(2):
        digit_image(i * 500).save(tmp_path / f"d{i}.png")
    code, out, err = vlmfit("predict", "tiny:qwen2_vl", tmp_path / "d0.png", "--images", tmp_path / "d1.png",
                            "--prompt", "What digit is this?", "--max-new-tokens", "4", "--out", tmp_path / "p.jsonl")
    assert code == 0, err
    rows = [json.loads(l) for l in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows] == [str(tmp_path / "d0.png"), str(tmp_path / "d1.png")]
    assert all(isinstance(r["answer"], str) and r["prompt"] == "What digit is this?" for r in rows)
    code, out, err = vlmfit("predict", "tiny:qwen2_vl", "--data", digits, "--limit", "3", "--max-new-tokens", "3",
                            "--out", tmp_path / "d.jsonl")
    assert code == 0, err
    rows = [json.loads(l) for l in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["reference"] and r["prompt"] == "What digit is this?" for r in rows)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: tiny:qwen2_vl}}\ndata: {{source: {digits}, eval_limit: 4}}\n"
                      f"train: {{max_steps: 2, batch_size: 4}}\neval: {{before: false, after: false}}\n"
                      f"output: {{dir: {tmp_path / 'runs'}, name: p}}\n")
    assert vlmfit("train", recipe)[0] == 0
    code, out, err = vlmfit("predict", tmp_path / "runs" / "p", tmp_path / "d0.png", "--max-new-tokens", "3")
    assert code == 0 and "1 answers" in out, err


@pytest.mark.parametrize("args, expect", [
    (["predict", "tiny:qwen2_vl"], "give images or videos, or --data"),
    (["predict", "tiny:qwen2_vl", "IMG", "--data", "builtin:mnist"], "give images or videos, or --data"),
    (["predict", "tiny:qwen2_vl", "--videos", "IMG"], "--videos takes video files"),
    (["predict", "tiny:qwen2_vl", "nothere.mp4"], "video file not found"),
    (["predict", "tiny:smolvlm", "VIDEO"], "takes images, not videos"),
    (["predict", "tiny:qwen2_vl", "VIDEO", "--fps", "0"], "--fps must be positive"),
    (["predict", "tiny:clip", "IMG"], "CLIP dual encoder"),
    (["predict", "tiny:qwen2_vl", "nothere.png"], "image file not found"),
    (["predict", "tiny:qwen2_vl", "--data", "DIGITS", "--split", "nosuch"], "no 'nosuch' split"),
])
def test_predict_usage_errors(vlmfit, digits, tmp_path, args, expect):
    digit_image(0).save(tmp_path / "d.png")
    video = str(sample_video_files()[0])
    args = [str(tmp_path / "d.png") if a == "IMG" else str(digits) if a == "DIGITS" else video if a == "VIDEO" else a
            for a in args]
    code, out, err = vlmfit(*args)
    assert code == 2 and expect in flat(err) and "Traceback" not in out + err, err


def test_predict_on_videos_and_images_together_keeps_their_order(vlmfit, tmp_path):
    """Videos (by extension, or --videos) get their frames sampled as for training and their own batches (a processor
    batch cannot mix rows with and without images); the answers come back in the order the files were given."""
    digit_image(0).save(tmp_path / "d.png")
    clip = {p.name: p for p in sample_video_files()}["carphone_pristine.mp4"]  # 4 s at 29.97 fps
    code, out, err = vlmfit("predict", "tiny:qwen2_vl", clip, tmp_path / "d.png", "--videos", clip, "--fps", "1",
                            "--max-frames", "4", "--max-new-tokens", "3", "--out", tmp_path / "v.jsonl")
    assert code == 0, err
    rows = [json.loads(l) for l in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert [r.get("video") or r.get("image") for r in rows] == [str(clip), str(tmp_path / "d.png"), str(clip)]
    assert rows[0]["frames"] == 4 and rows[0]["prompt"] == "Describe this video."
    assert rows[1]["prompt"] == "Describe this image." and "frames" not in rows[1]
    assert rows[0]["answer"] == rows[2]["answer"]  # the same clip, greedy: the same answer in either batch position
