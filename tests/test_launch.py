"""Issue 15, what runs without starting processes: the launch commands (torchrun, sbatch, hf jobs) against golden
files, refusals before launch, secrets never printed, the FSDP wrap classes per family, and the blank-tower
inputs that keep ranks in step. The multi-process runs are in tests/test_launch_ranks.py (slow)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from vlmfit.errors import UserError
from vlmfit.launch.local import Launch, torchrun_argv

GOLDEN = Path(__file__).parent / "golden" / "launch"
RECIPE = "model: {name: 'tiny:qwen2_vl'}\ndata: {source: 'builtin:mnist'}\nmethod: lora\noutput: {dir: runs, name: digits}\n"


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "r.yaml"
    p.write_text(RECIPE)
    return p


def golden(name: str, text: str, tmp_path: Path) -> None:
    """`text` with this machine's paths replaced by placeholders equals the golden file."""
    text = text.replace(str(tmp_path), "<TMP>").replace(sys.executable, "<PYTHON>")
    assert text == (GOLDEN / name).read_text(), f"differs from tests/golden/launch/{name}:\n{text}"


def test_torchrun_command_one_machine_and_several():
    one = torchrun_argv(Launch(recipe="r.yaml", nproc=4, strategy="ddp"), python="python")
    assert one == ["python", "-m", "torch.distributed.run", "--nproc-per-node=4", "--standalone", "-m", "vlmfit",
                   "train", "r.yaml", "--set", "launch.strategy=ddp"]
    two = torchrun_argv(Launch(recipe="r.yaml", nproc=8, nnodes=2, node_rank=1, master="10.0.0.1:29500"), python="python")
    assert two[3:8] == ["--nproc-per-node=8", "--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=29500"]
    resume = torchrun_argv(Launch(recipe=None, nproc=2, resume="runs/x"), python="python")
    assert resume[-3:] == ["train", "--resume", "runs/x"]
    with pytest.raises(UserError, match="needs the address of node 0"):
        torchrun_argv(Launch(recipe="r.yaml", nproc=8, nnodes=2))
    with pytest.raises(UserError, match="is not ADDR:PORT"):
        torchrun_argv(Launch(recipe="r.yaml", nnodes=2, master="10.0.0.1"))


def test_dry_run_prints_the_command_with_the_strategy_and_the_global_batch(vlmfit, recipe):
    code, out, err = vlmfit("launch", recipe, "--nproc", "2", "--set", "train.batch_size=3", "--set", "train.grad_accum=2",
                            "--dry-run")
    assert code == 0, err
    assert "global batch 12 (per device 3 x accumulation 2 x 2 processes)" in " ".join(out.split())
    last = out.strip().splitlines()[-1]
    assert "--nproc-per-node=2 --standalone -m vlmfit train" in last and "--set train.batch_size=3" in last
    assert "--set launch.strategy=ddp" in last


def test_sbatch_script_matches_golden(vlmfit, recipe, tmp_path):
    code, out, err = vlmfit("launch", recipe, "--slurm", "--nodes", "2", "--gpus-per-node", "8", "--strategy", "ddp",
                            "--timeout", "2h", "--partition", "gpu", "--dry-run")
    assert code == 0, err
    script = out[out.index("#!/bin/bash"):]
    golden("sbatch_2x8.sh", script, tmp_path)


def test_sbatch_without_slurm_writes_the_script_and_says_where(vlmfit, recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    code, out, err = vlmfit("launch", recipe, "--slurm", "--nodes", "2", "--gpus-per-node", "4")
    assert code == 2 and "sbatch is not on this machine's PATH" in err and "Traceback" not in err
    assert (tmp_path / "runs" / "digits.sbatch").is_file()


def test_hf_jobs_command_and_script_match_golden_and_never_hold_a_secret(vlmfit, recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETVALUE123")
    monkeypatch.setenv("WANDB_API_KEY", "wandb-SECRET-456")
    code, out, err = vlmfit("launch", recipe, "--hf-jobs", "--flavor", "a100-large", "--timeout", "2h", "--push-to",
                            "me/vlmfit-runs", "--secret", "WANDB_API_KEY", "--package", "vlmfit==0.1.0", "--dry-run")
    assert code == 0, err
    command = out.strip().splitlines()[-1]
    assert command == ("hf jobs uv run --flavor a100-large --timeout 2h --secrets HF_TOKEN --secrets WANDB_API_KEY "
                       "--detach runs/digits.hfjob.py")
    script = (tmp_path / "runs" / "digits.hfjob.py").read_text()
    # The embedded recipe is the resolved one (every default), so it changes with the config: checked by value
    # here, and it stands as <RECIPE> in the golden file.
    import yaml

    from vlmfit.config import load_config

    opening, closing = "RECIPE = '''\\\n", "'''\n\n\ndef main"
    start, end = script.index(opening) + len(opening), script.index(closing)
    embedded = load_config(base=yaml.safe_load(script[start:end]))
    assert embedded.output.name == "digits" and str(embedded.output.dir) == "/tmp/runs"
    assert embedded.model_dump(exclude={"output"}) == load_config(recipe).model_dump(exclude={"output"})
    golden("hfjob.py", script[:start] + "<RECIPE>\n" + script[end:], tmp_path)
    for text in (out, err, script):
        assert "SECRETVALUE" not in text and "SECRET-456" not in text
    compile(script, "hfjob.py", "exec")  # the job's script is Python that parses


@pytest.mark.parametrize("args, expect", [
    (["--set", "data.source=./local-data"], "cannot read: upload it"),
    (["--flavor", "a100-lage"], "did you mean 'a100-large'"),
    (["--secret", "hf_abc123=x"], "pass names, never values"),
])
def test_hf_jobs_refusals(vlmfit, recipe, tmp_path, args, expect):
    (tmp_path / "local-data").mkdir()
    code, out, err = vlmfit("launch", recipe, "--hf-jobs", "--push-to", "me/runs", *args, "--dry-run")
    assert code == 2 and expect in " ".join(err.split()) and "Traceback" not in err, err


def test_hf_jobs_needs_a_destination(vlmfit, recipe):
    code, out, err = vlmfit("launch", recipe, "--hf-jobs", "--dry-run")
    assert code == 2 and "--push-to" in err


@pytest.mark.parametrize("args, expect", [
    (["--strategy", "fsdp", "--set", "method=qlora"], "FSDP2 cannot shard 4-bit"),
    (["--strategy", "zero3"], "needs DeepSpeed, which is not installed"),
    (["--strategy", "zero2"], "needs DeepSpeed, which is not installed"),
    (["--set", "method=zo"], "runs in one process"),
    (["--strategy", "zer3"], "'launch.strategy'"),
    (["--nproc", "0"], "at least 1"),
    (["--nnodes", "2"], "needs the address of node 0"),
    (["--nnodes", "2", "--node-rank", "2", "--master", "h:1"], "is not one of 0..1"),
    (["--slurm", "--hf-jobs", "--push-to", "me/r"], "pick one"),
])
def test_refused_before_any_process_starts(vlmfit, recipe, args, expect):
    import importlib.util

    if "DeepSpeed" in expect and importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    code, out, err = vlmfit("launch", recipe, *args, "--dry-run")
    assert code == 2 and expect in " ".join(err.split()) and "Traceback" not in err, err


def test_fsdp_on_cpus_is_refused_rather_than_silently_ddp(vlmfit, recipe):
    if torch.cuda.is_available():
        pytest.skip("a GPU machine runs FSDP2")
    code, out, err = vlmfit("launch", recipe, "--nproc", "2", "--strategy", "fsdp")
    assert code == 2 and "would silently be DDP" in " ".join(err.split())


def test_launch_without_a_recipe_and_resume_with_a_recipe(vlmfit, recipe, tmp_path):
    code, _, err = vlmfit("launch", "--nproc", "2")
    assert code == 2 and "Missing argument 'RECIPE'" in err
    code, _, err = vlmfit("launch", recipe, "--resume", tmp_path)
    assert code == 2 and "continues a run with its own recipe" in err


def test_resume_under_another_process_count_is_refused_before_launch(vlmfit, tmp_path):
    from vlmfit.config import load_config
    from vlmfit.rundir import RunDir

    cfg = load_config(base={"model": {"name": "tiny:qwen2_vl"}, "output": {"dir": str(tmp_path), "name": "r"}})
    run = RunDir.create(cfg)
    run.checkpoint(4).mkdir(parents=True)
    run.complete_checkpoint(4, {"world_size": 2, "epoch": 0.5})
    code, out, err = vlmfit("launch", "--resume", run.path, "--nproc", "4", "--dry-run")
    assert code == 2 and "written by 2 processes, this launch has 4" in " ".join(err.split())
    code, out, err = vlmfit("launch", "--resume", run.path, "--nproc", "2", "--dry-run")
    assert code == 0 and out.strip().splitlines()[-1].endswith(f"train --resume {run.path}"), err


# The FSDP2 wrap list: the repeated blocks of both towers (transformers' _no_split_modules names Idefics3's vision
# attention, not its encoder layer; a list with the decoder layers alone leaves the vision tower unsharded).
SHARD_LAYERS = {
    "qwen2_vl": ["Qwen2VLVisionBlock", "Qwen2VLDecoderLayer"],
    "qwen2_5_vl": ["Qwen2_5_VLVisionBlock", "Qwen2_5_VLDecoderLayer"],
    "qwen3_vl": ["Qwen3VLVisionBlock", "Qwen3VLTextDecoderLayer"],
    "llava": ["CLIPEncoderLayer", "LlamaDecoderLayer"],
    "smolvlm": ["Idefics3EncoderLayer", "LlamaDecoderLayer"],
    "paligemma": ["SiglipEncoderLayer", "Gemma2DecoderLayer"],
    "gemma3": ["SiglipEncoderLayer", "Gemma3DecoderLayer"],
    "gemma4": ["Gemma4VisionEncoderLayer", "Gemma4TextDecoderLayer"],
}


@pytest.mark.parametrize("family", list(SHARD_LAYERS))
def test_fsdp_wraps_the_blocks_of_both_towers(family):
    from vlmfit.config import LoraConfig
    from vlmfit.launch.strategy import fsdp_config, shard_layers
    from vlmfit.models.load import load
    from vlmfit.models.targets import make_trainable

    loaded = load(f"tiny:{family}", "float32")
    assert shard_layers(loaded.model, loaded.family) == SHARD_LAYERS[family]
    classes = {type(m).__name__ for m in loaded.model.modules()}
    assert set(SHARD_LAYERS[family]) <= classes
    peft_model, _ = make_trainable(loaded.model, loaded.family, "lora", LoraConfig())
    assert fsdp_config(peft_model, loaded.family)["transformer_layer_cls_to_wrap"] == SHARD_LAYERS[family]


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "smolvlm", "gemma3"])
def test_a_batch_without_images_still_runs_the_tower_with_zero_effect(family):
    """What keeps DDP / FSDP2 / ZeRO-3 ranks in step: every vision parameter gets a gradient (zero) from a text-only
    batch, so every rank reduces the same buckets; and a batch with images adds nothing."""
    from vlmfit.models.load import load
    from vlmfit.models.targets import part_of
    from vlmfit.models.towers import TowerSync

    from helpers import digit_image

    loaded = load(f"tiny:{family}", "float32")
    model = loaded.model
    vision = {n: p for n, p in model.named_parameters() if part_of(n, loaded.family) == "vision"}
    # the vision parameters an image batch's features reach (LLaVA reads layer -2: its last layer gets no gradient)
    real = dict(loaded.processor.image_processor(images=[digit_image(3)], return_tensors="pt"))
    sum(t.sum() for t in _features(model, real)).backward()
    used = {n for n, p in vision.items() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    blank = TowerSync(loaded.processor).touch(model, {"input_ids": torch.ones(1, 4, dtype=torch.long)})
    assert blank is not None and blank.item() == 0.0
    blank.backward()
    reached = {n for n, p in vision.items() if p.grad is not None}
    assert used and used <= reached, sorted(used - reached)
    assert not any(vision[n].grad.any() for n in reached)  # zero: the step's gradient is the real batch's
    assert TowerSync(loaded.processor).touch(model, {"pixel_values": torch.zeros(1)}) is None


def _features(model, inputs):
    """The real image's features, through the same get_image_features call the blank input takes."""
    import inspect

    from vlmfit.models.towers import _tensors

    fn = model.get_image_features
    return _tensors(fn(**{k: v for k, v in inputs.items() if k in inspect.signature(fn).parameters}))


def test_launch_json_records_what_the_engine_was_given(tmp_path):
    """The run directory says how it was shared out; written from the same dict the Trainer gets."""
    from vlmfit.launch.strategy import deepspeed_config, strategy_arguments

    ds = deepspeed_config("zero3", True, False)
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    assert ds["train_micro_batch_size_per_gpu"] == "auto"  # the Trainer fills it from the recipe
    assert strategy_arguments("ddp", None, None, False, False, True) == {"ddp_find_unused_parameters": True}
    json.dumps(strategy_arguments("zero2", None, None, False, False, False))  # serialisable into launch.json
