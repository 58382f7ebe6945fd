"""`vlmfit eval` results are cached per weights + data + settings: an unchanged rerun does not evaluate again, and
a change of any of them (or --no-cache) does."""

import os
import shutil

from vlmfit.models.tiny import tiny_path


def test_eval_results_are_reused_until_weights_data_or_settings_change(vlmfit, digits, tmp_path, monkeypatch):
    import datasets

    from vlmfit.evaluate import eval as ev

    model = tmp_path / "model"
    shutil.copytree(tiny_path("qwen2_vl"), model)  # an exported-model directory: files the test can change
    monkeypatch.setenv("VLMFIT_CACHE", str(tmp_path / "cache"))  # after tiny_path: the model is built already
    calls = []
    real = ev.evaluate_chat
    monkeypatch.setattr(ev, "evaluate_chat", lambda *a: calls.append(1) or real(*a))

    def run(*extra, data=digits):
        code, out, err = vlmfit("eval", model, "--set", f"data.source={data}", "--set", "eval.modes=[constrained]", *extra)
        assert code == 0, err
        return " ".join(out.split())

    first = run()
    assert len(calls) == 1 and len(list((tmp_path / "cache" / "evals").glob("*.json"))) == 1
    again = run()
    assert len(calls) == 1 and "cached result" in again
    figure = first.split("constrained: ")[1].split("%")[0]
    assert f"constrained {figure}%" in again  # the same result, from the cache

    run("--no-cache")
    assert len(calls) == 2
    run("--set", "eval.batch_size=4")  # another setting
    assert len(calls) == 3
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten weights
    run()
    assert len(calls) == 4
    other = tmp_path / "other"
    d = datasets.load_from_disk(str(digits))
    datasets.DatasetDict({"train": d["train"], "test": d["test"].select(range(4))}).save_to_disk(str(other))
    run(data=other)  # other data
    assert len(calls) == 5
    run()
    assert len(calls) == 5  # back to the first data and weights: cached
