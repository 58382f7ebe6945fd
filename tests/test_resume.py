"""Issue 14: runs that survive kills. A run SIGKILLed at a random step (or in the middle of writing a checkpoint)
and resumed ends with the weights of an uninterrupted run, with continuous metrics; SIGTERM stops at a resumable
checkpoint; a NaN is caught with its step and rows; resuming refuses what it cannot continue exactly."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from vlmfit.config import load_config
from vlmfit.rundir import CHECKPOINT_DONE, RunDir

STEPS = 8


def flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long messages


def recipe(tmp_path, digits, name, method="lora", extra="", dpo="", after="false"):
    p = tmp_path / f"{name}.yaml"
    p.write_text(textwrap.dedent(f"""\
        model: {{name: tiny:qwen2_vl}}
        method: {method}
        {dpo}
        data: {{source: {digits}, train_limit: 16, eval_limit: 4}}
        lora: {{train_fully: [projector]}}
        train: {{max_steps: {STEPS}, batch_size: 2, lr: 0.01, warmup_ratio: 0.1, logging_steps: 1, save_steps: 2, seed: 5{extra}}}
        eval: {{before: false, after: {after}, modes: [constrained]}}
        output: {{dir: {tmp_path / 'runs'}, name: {name}}}
        """))
    return p


# A training process that kills itself: at the end of step K, or (where=save) after the Trainer wrote checkpoint-K
# but before vlmfit marked it complete: a checkpoint truncated mid-write.
KILLER = textwrap.dedent("""\
    import os, sys
    from transformers import TrainerCallback
    import vlmfit.train.sft as sft
    from vlmfit.rundir import RunDir
    path, k, sig, where = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if where == "step" and state.global_step == k:
                os.kill(os.getpid(), sig)

    import vlmfit.train.trainer as trainer
    made = trainer.trainer_callbacks
    trainer.trainer_callbacks = lambda run, guard, cfg: [Kill()] + made(run, guard, cfg)
    import vlmfit.train.dpo as dpo
    import vlmfit.train.grpo as grpo
    sft.trainer_callbacks = dpo.trainer_callbacks = grpo.trainer_callbacks = trainer.trainer_callbacks
    complete = RunDir.complete_checkpoint
    def complete_or_die(self, step, info, keep=None):
        if where == "save" and step == k:
            os.kill(os.getpid(), sig)
        return complete(self, step, info, keep)
    RunDir.complete_checkpoint = complete_or_die
    sys.argv = ["vlmfit", "train", path]
    from vlmfit.cli import main
    main()
    """)


def killed_run(tmp_path, path, k, sig=signal.SIGKILL, where="step"):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, str(script), str(path), str(k), str(int(sig)), where],
                          capture_output=True, text=True, timeout=600, env=env)


def weights(run_dir, method):
    f = run_dir / ("adapter/adapter_model.safetensors" if method == "lora" else "model/model.safetensors")
    return load_file(str(f))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in RunDir(run_dir).metrics() if "loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits):
    """Uninterrupted runs, in process: what every interrupted run must end with."""
    from rich.console import Console

    from vlmfit.train.sft import train_sft

    tmp = tmp_path_factory.mktemp("reference")
    out = {}
    for method in ("lora", "full"):
        cfg = load_config(recipe(tmp, digits, f"ref-{method}", method))
        out[method] = train_sft(cfg, Console(quiet=True))
    return out


@pytest.mark.parametrize("method, where", [("lora", "step"), pytest.param("full", "save", marks=pytest.mark.slow)])
def test_sigkill_at_a_random_step_then_resume_ends_with_the_same_weights(vlmfit, reference, digits, tmp_path, method, where):
    rng = random.Random(os.getpid())  # a random step, printed on failure; a save step when killed mid-save
    k = rng.randint(3, STEPS - 1) if where == "step" else rng.choice([4, 6])
    path = recipe(tmp_path, digits, "killed", method)
    proc = killed_run(tmp_path, path, k, signal.SIGKILL, where)
    assert proc.returncode == -signal.SIGKILL, (k, proc.stderr[-2000:])
    run = tmp_path / "runs" / "killed"
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*"))
    if where == "save":  # killed between the Trainer's files and the completion marker
        assert not (run / "checkpoints" / f"checkpoint-{k}" / CHECKPOINT_DONE).exists() and f"checkpoint-{k}" in ckpts
    code, out, err = vlmfit("train", "--resume", run)
    assert code == 0, (k, err)
    if where == "save":  # resumed from the checkpoint before the truncated one, which was dropped and redone
        assert json.loads((run / "summary.json").read_text())["resumed_from"] == [k - 2]
    assert max_diff(weights(run, method), weights(reference[method], method)) <= 1e-6, k
    # metrics.jsonl: every step once, with the uninterrupted run's losses
    assert [s for s, _ in losses(run)] == list(range(1, STEPS + 1)), (k, losses(run))
    assert [v for _, v in losses(run)] == pytest.approx([v for _, v in losses(reference[method])], abs=1e-6)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["resumed_from"] and summary["resumed_from"][0] < k
    if method == "lora":  # the fully trained projector is in the adapter and moved: with the equality above, it
        # kept training after the resume (had it come back frozen, its last steps would be missing)
        from vlmfit.models.load import load

        base = load("tiny:qwen2_vl", "float32").model.state_dict()["model.visual.merger.mlp.0.weight"]
        saved = weights(run, method)["base_model.model.model.visual.merger.mlp.0.weight"]
        assert (saved - base).abs().max().item() > 1e-4


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(vlmfit, reference, digits, tmp_path):
    k = 3  # not a save step: the checkpoint is the signal's
    path = recipe(tmp_path, digits, "termed")
    proc = killed_run(tmp_path, path, k, signal.SIGTERM)
    text = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 128 + signal.SIGTERM, text[-2000:]
    assert f"stopped by SIGTERM after step {k}" in text and "vlmfit train --resume" in text and "Traceback" not in text
    run = RunDir(tmp_path / "runs" / "termed")
    assert [s for s, _ in run.complete_checkpoints()][-1] == k
    assert not (run.path / "summary.json").exists()
    code, out, err = vlmfit("train", "--resume", run.path)
    assert code == 0, err
    assert max_diff(weights(run.path, "lora"), weights(reference["lora"], "lora")) <= 1e-6


@pytest.mark.slow
def test_dpo_full_resumes_policy_and_keeps_the_starting_reference(vlmfit, digits, tmp_path):
    """DPO tuned in full: the resumed policy comes from the checkpoint, its reference stays the starting model."""
    from rich.console import Console

    from vlmfit.train.dpo import train_dpo

    dpo = "dpo: {tuning: full, pairs_from_labels: mixed, beta: 2.0}"
    train_dpo(load_config(recipe(tmp_path, digits, "dpo-ref", "dpo", dpo=dpo, after="true")), Console(quiet=True))
    proc = killed_run(tmp_path, recipe(tmp_path, digits, "dpo-cut", "dpo", dpo=dpo, after="true"), 3, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    code, out, err = vlmfit("train", "--resume", tmp_path / "runs" / "dpo-cut")
    assert code == 0, err
    a, b = (weights(tmp_path / "runs" / n, "full") for n in ("dpo-ref", "dpo-cut"))
    assert max_diff(a, b) <= 1e-6
    ref, cut = (json.loads((tmp_path / "runs" / n / "eval_after.json").read_text())["preference"] for n in ("dpo-ref", "dpo-cut"))
    assert cut["reward_margin"] == pytest.approx(ref["reward_margin"], abs=1e-5)  # rewards against the same reference


def poisoned_collator(monkeypatch, row: int, seen: list):
    """Batches holding train row `row` get NaN pixel values (a corrupt image tensor): the loss and gradients are NaN."""
    from vlmfit.chat.collate import ROW
    from vlmfit.chat.rows import RowCollator  # the training collator (train.processor_cache is on by default)

    call = RowCollator.__call__

    def collate(self, examples):
        batch = call(self, examples)
        if ROW in batch and row in batch[ROW].tolist():
            batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
            seen.append(batch[ROW].tolist())
        return batch

    monkeypatch.setattr(RowCollator, "__call__", collate)


@pytest.mark.parametrize("action", ["stop", "skip"])
def test_a_nan_is_caught_with_its_step_and_rows(vlmfit, digits, tmp_path, monkeypatch, action):
    seen: list = []
    poisoned_collator(monkeypatch, row=5, seen=seen)
    path = recipe(tmp_path, digits, "nan", extra=f", on_divergence: {action}")
    code, out, err = vlmfit("train", path)
    text = " ".join((out + err).split())
    run = RunDir(tmp_path / "runs" / "nan")
    events = [r["divergence"] for r in run.metrics() if "divergence" in r]
    assert seen and len(events) == len(seen) >= 1
    first = events[0]
    assert first["rows"] == seen[0] and first["grad_norm"] == "nan"
    if action == "stop":
        assert code == 3 and f"training diverged at step {first['step']}" in text and str(seen[0]) in text, text
        assert "Traceback" not in text
        assert all(s < first["step"] for s, _ in run.complete_checkpoints())  # no checkpoint of the bad step
    else:
        assert code == 0, err
        summary = json.loads((run.path / "summary.json").read_text())
        assert summary["divergence"] == events and summary["steps"] == STEPS
        assert all(torch.isfinite(t).all() for t in weights(run.path, "lora").values())  # the bad steps never applied


def refused_alike(vlmfit, cli_args: list, setup=lambda: None, **api) -> str:
    """`vlmfit train ARGS` and vlmfit.train(**api) refuse with the same message (the CLI: exit 2, no traceback);
    `setup` puts the run back as it was before each (a refusal may tidy it: incomplete checkpoints go)."""
    import vlmfit as package
    from vlmfit.errors import UserError

    setup()
    code, out, err = vlmfit("train", *cli_args)
    setup()
    with pytest.raises(UserError) as refused:
        package.train(**api)
    assert code == 2 and "Traceback" not in err, err
    bare = lambda text: "".join(text.split())  # noqa: E731 (rich wraps long paths mid-word)
    assert bare(refused.value.render()) in bare(err), (refused.value.render(), err)
    return flat(err)


def test_resume_refuses_what_it_cannot_continue_exactly(vlmfit, reference, digits, tmp_path, monkeypatch):
    """Each refusal, from the CLI and from the Python API alike (train/api.py is the CLI's own code path)."""
    import shutil

    finished = reference["lora"]
    assert "this run finished" in refused_alike(vlmfit, ["--resume", finished], resume=finished)
    # an unfinished copy of it (summary removed) resumes only with the same package versions and process count
    run = tmp_path / "copy"
    shutil.copytree(finished, run)
    (run / "summary.json").unlink()
    env = json.loads((run / "environment.json").read_text())
    env["packages"]["transformers"] = "4.0.0"
    (run / "environment.json").write_text(json.dumps(env))
    assert "transformers 4.0.0 ->" in refused_alike(vlmfit, ["--resume", run], resume=run)
    shutil.copy(finished / "environment.json", run / "environment.json")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "written by 1 processes, this is 2" in refused_alike(vlmfit, ["--resume", run], resume=run)
    monkeypatch.delenv("WORLD_SIZE")

    def incomplete():
        shutil.rmtree(run)
        shutil.copytree(finished, run)
        (run / "summary.json").unlink()
        for p in (run / "checkpoints").glob("checkpoint-*"):
            (p / CHECKPOINT_DONE).unlink()  # every checkpoint incomplete

    text = refused_alike(vlmfit, ["--resume", run], setup=incomplete, resume=run)
    assert "no complete checkpoint" in text and "was incomplete" in text and all(f"checkpoint-{s}" in text for s in (6, 8))
    assert "--resume continues a run with its own recipe" in refused_alike(
        vlmfit, ["recipes/demo.yaml", "--resume", run], recipe="recipes/demo.yaml", resume=run)
    assert "--resume continues a run with its own recipe" in refused_alike(
        vlmfit, ["--resume", run, "--set", "train.lr=1"], overrides=["train.lr=1"], resume=run)
    assert "not a run directory" in refused_alike(vlmfit, ["--resume", tmp_path / "nowhere"], resume=tmp_path / "nowhere")
    assert "Missing argument 'RECIPE'" in refused_alike(vlmfit, [])


def test_an_existing_run_directory_is_never_overwritten_without_overwrite(vlmfit, digits, tmp_path):
    path = recipe(tmp_path, digits, "again", extra=", max_steps: 1")
    assert vlmfit("train", path)[0] == 0
    code, out, err = vlmfit("train", path)
    text = " ".join(err.split())
    assert code == 2 and "already exists and holds another run" in text and "--overwrite" in text
    code, out, err = vlmfit("train", path, "--overwrite")
    assert code == 0, err


def test_too_little_disk_is_refused_before_training_and_a_full_disk_mid_run_is_one_message(vlmfit, digits, tmp_path, monkeypatch):
    import errno
    import shutil
    from collections import namedtuple

    import vlmfit.train.run as run_module

    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(run_module.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    code, out, err = vlmfit("train", recipe(tmp_path, digits, "small"))
    text = " ".join(err.split())
    assert code == 2 and "0.0 MiB free on the disk" in text and "a checkpoint needs about" in text, text
    assert not (tmp_path / "runs" / "small").exists()  # refused before the run directory was made
    monkeypatch.setattr(run_module.shutil, "disk_usage", real)

    # the disk fills while checkpoint-4 is written: the run ends with the last complete checkpoint intact
    from vlmfit.rundir import RunDir as R

    complete = R.complete_checkpoint

    def full_at_4(self, step, info, keep=None):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return complete(self, step, info, keep)

    monkeypatch.setattr(R, "complete_checkpoint", full_at_4)
    code, out, err = vlmfit("train", recipe(tmp_path, digits, "full-disk"))
    text = " ".join(err.split())
    assert code == 3 and "the disk is full" in text and "resume from checkpoint-2" in text and "Traceback" not in text, text
    run = RunDir(tmp_path / "runs" / "full-disk")
    assert [s for s, _ in run.complete_checkpoints()] == [2]
    assert not (run.path / "checkpoints" / "checkpoint-4").exists()  # the half-written one is gone


ZO_KILLER = textwrap.dedent("""\
    import os, signal, sys
    from vlmfit.train import zo
    path, at = sys.argv[1], int(sys.argv[2])
    record = zo.Budget._record
    def record_then_die(self, stage):
        record(self, stage)
        if self.used >= at:
            os.kill(os.getpid(), signal.SIGKILL)
    zo.Budget._record = record_then_die
    sys.argv = ["vlmfit", "train", path]
    from vlmfit.cli import main
    main()
    """)


# inside CMA-ES (stage 1) and inside sparse ZO (stage 2)
@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [90, 260])
def test_a_killed_zo_run_resumes_its_cma_es_state_seeds_and_budget(vlmfit, tmp_path, kill_at):
    from rich.console import Console

    from vlmfit.train.zo import train_zo

    def zo_recipe(name):
        p = tmp_path / f"{name}.yaml"
        p.write_text(textwrap.dedent(f"""\
            model: {{name: tiny:clip, dtype: float32}}
            method: zo
            data: {{source: builtin:mnist-noisy, shots_per_class: 4, eval_limit: 100}}
            zo: {{optimizer: sharpzo, forward_passes: 300, generations: 20, popsize: 8, eval_every: 40, lr: 0.1,
                  intrinsic_dim: 64, sparsity: 0.5}}
            train: {{batch_size: 20, seed: 1}}
            output: {{dir: {tmp_path / 'runs'}, name: {name}}}
            """))
        return p

    ref = train_zo(load_config(zo_recipe("zo-ref")), Console(quiet=True))
    script = tmp_path / "zo_killer.py"
    script.write_text(ZO_KILLER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, str(script), str(zo_recipe("zo-cut")), str(kill_at)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    cut = tmp_path / "runs" / "zo-cut"
    code, out, err = vlmfit("train", "--resume", cut)
    assert code == 0, err
    a, b = (load_file(str(r / "prompt.safetensors"))["context"] for r in (ref, cut))
    assert (a - b).abs().max().item() <= 1e-6
    strip = lambda h: [{k: v for k, v in r.items() if k != "train_seconds"} for r in h]  # noqa: E731
    ra, rb = (json.loads((r / "summary.json").read_text()) for r in (ref, cut))
    assert strip(rb["zo"]["history"]) == strip(ra["zo"]["history"]) and rb["zo"]["forward_passes"] == 300
    assert rb["resumed_from"][0] >= kill_at and rb["zo"]["outliers_skipped"] == ra["zo"]["outliers_skipped"]
    stage = {r["step"]: r.get("stage") for r in ra["zo"]["history"]}[rb["resumed_from"][0]]
    assert stage == ("cma-es" if kill_at < 200 else "sparse-zo")  # 20 generations x 10 passes, then sparse ZO
    assert [r["step"] for r in RunDir(cut).metrics()] == [r["step"] for r in RunDir(ref).metrics()]  # no repeats, no gaps


ZO_TERM = textwrap.dedent("""\
    import os, signal, sys
    from vlmfit.train import zo
    path, at = sys.argv[1], int(sys.argv[2])
    record = zo.Budget._record
    def record_then_term(self, stage):
        record(self, stage)
        if self.used == at:
            os.kill(os.getpid(), signal.SIGTERM)
    zo.Budget._record = record_then_term
    sys.argv = ["vlmfit", "train", path]
    from vlmfit.cli import main
    main()
    """)


def test_sigterm_stops_a_zo_run_at_its_next_checkpoint_and_it_resumes(vlmfit, tmp_path):
    """Forward-only runs stop cleanly too (train/run.py's SignalCatcher): the SIGTERM at 40 forward passes stops the
    run at its next checkpoint (80), exit 128 + 15 with the resume command; the resume ends the budget."""
    p = tmp_path / "zo.yaml"
    p.write_text(textwrap.dedent(f"""\
        model: {{name: tiny:clip, dtype: float32}}
        method: zo
        data: {{source: builtin:mnist-noisy, shots_per_class: 2, eval_limit: 20}}
        zo: {{optimizer: mezo, forward_passes: 120, eval_every: 40, lr: 0.1, intrinsic_dim: 16}}
        train: {{batch_size: 10, seed: 1}}
        output: {{dir: {tmp_path / 'runs'}, name: zo-term}}
        """))
    script = tmp_path / "zo_term.py"
    script.write_text(ZO_TERM)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, str(script), str(p), "40"], capture_output=True, text=True, timeout=600, env=env)
    text = flat(proc.stderr)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "stopped by SIGTERM after 80 forward passes" in text and "vlmfit train --resume" in text and "Traceback" not in text
    run = RunDir(tmp_path / "runs" / "zo-term")
    assert [s for s, _ in run.complete_checkpoints()] == [40, 80] and run.read_json("summary.json") is None
    code, out, err = vlmfit("train", "--resume", run.path)
    assert code == 0, err
    summary = run.summary()
    assert summary.resumed_from == [80] and summary.zo["forward_passes"] == 120
    assert [r["step"] for r in run.metrics()] == [0, 40, 80, 120]
