"""method: grpo. What makes it correct for VLMs where the anchors break: each image encoded once for all completions of
its prompt (equal loss and gradients), no multimodal placeholder ever sampled (every family), prompts never cut
through their images, equal updates under gradient accumulation, rewards that fail loudly; and the recipe end to end."""

import json

import datasets
import pytest
import torch
from rich.console import Console

from vlmfit.chat.collate import VisionChatCollator
from vlmfit.chat.schema import chat_example
from vlmfit.config import load_config
from vlmfit.errors import UserError
from vlmfit.models.families import get_family
from vlmfit.models.load import load
from vlmfit.models.rollout import SharedVision, placeholder_ids
from vlmfit.models.tiny import TINY_FAMILIES
from vlmfit.rundir import RunDir
from vlmfit.train import rewards as R
from vlmfit.train.grpo import make_trainer, prompt_length_policy, prompt_rows
from vlmfit.train.trainer import with_row_ids

from helpers import digit_image

QUIET = Console(quiet=True)
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _trainable(family):
    loaded = load(f"tiny:{family}")
    loaded.model.float().train()
    for p in loaded.model.parameters():
        p.requires_grad_(True)
    return loaded


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_shared_vision_encodes_each_distinct_image_once_with_equal_loss_and_gradients(family):
    loaded = _trainable(family)
    model = loaded.model
    coll = VisionChatCollator(loaded.processor, loaded.family)
    # four completions of two prompts, interleaved as TRL's repeat sampler does not (equal images need not be adjacent)
    batch = coll([chat_example("What digit is this?", w, [digit_image(i)])
                  for w, i in (("seven", 0), ("two", 5), ("seven", 0), ("one", 5))])
    ref = model(**batch, use_cache=False).loss
    ref.backward()
    g_ref = _grads(model)
    model.zero_grad(set_to_none=True)
    shared = SharedVision(model)
    try:
        loss = model(**batch, use_cache=False).loss
        loss.backward()
    finally:
        shared.remove()
    g = _grads(model)
    assert (shared.images_in, shared.images_encoded) == (4, 2)
    assert torch.allclose(loss, ref, rtol=1e-5), (float(loss), float(ref))
    assert g.keys() == g_ref.keys()
    vision = [n for n in g if "vision" in n or "visual" in n]
    assert vision  # the tower trains here: its gradient is the sum over the copies, as without sharing
    for n in g:
        diff, size = float((g[n] - g_ref[n]).norm()), float(g_ref[n].norm())
        assert diff <= 1e-4 * size + 1e-8, (n, diff, size)
    assert "get_image_features" not in vars(shared.target)  # removed: the class's own method again


def test_shared_vision_reuses_features_across_calls_only_when_asked():
    loaded = load("tiny:qwen2_vl")
    model = loaded.model.eval()
    coll = VisionChatCollator(loaded.processor, loaded.family)
    batch = coll([chat_example("What digit is this?", "seven", [digit_image(0)])] * 2)
    with torch.no_grad():
        ref = model(**batch, use_cache=False).logits
        shared = SharedVision(model, reuse=True)
        first = model(**batch, use_cache=False).logits
        second = model(**batch, use_cache=False).logits
        assert (shared.images_in, shared.images_encoded) == (4, 1)  # the second call encodes nothing
        shared.clear()
        model(**batch, use_cache=False)
        assert shared.images_encoded == 2  # cleared: the next batch of rollouts encodes again
        shared.remove()
    assert torch.allclose(first, ref, atol=1e-5) and torch.equal(first, second)


def _emitted_placeholders(loaded) -> set[int]:
    """The added tokens the processor writes for an image that the same text without the image does not have: what
    a placeholder is, found from the processor's output rather than from the names models/rollout.py reads."""
    coll = VisionChatCollator(loaded.processor, loaded.family)
    with_image = chat_example("What digit is this?", "seven", [digit_image(0, (56, 84))])
    without = chat_example("What digit is this?", "seven", [])
    ids_with = coll([with_image])["input_ids"][0].tolist()
    ids_without = loaded.processor.tokenizer(coll.render(without["messages"]))["input_ids"]  # no image: text only
    tok = loaded.processor.tokenizer
    added = set(tok.get_added_vocab().values())  # not a word the image's neighbour became
    text_specials = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}  # PaliGemma's prefix/suffix adds them
    return (set(ids_with) - set(ids_without)) & added - text_specials


def _biased_generation(loaded, biased: list[int], suppress: list[int] | None):
    """Sampled generation with the head's logits for `biased` raised by 30 (the placeholders made the likeliest)."""
    model = loaded.model.eval()
    coll = VisionChatCollator(loaded.processor, loaded.family)
    ex = chat_example("What digit is this?", "seven", [digit_image(3)])
    inputs = coll.encode([coll.render(ex["messages"][:-1], add_generation_prompt=True)], [ex["images"]], padding_side="left")
    inputs.pop("labels", None)
    head = model.get_output_embeddings()

    def bias(module, args, out):
        out = out.clone()
        out[..., biased] += 30.0
        return out

    hook = head.register_forward_hook(bias)
    try:
        torch.manual_seed(0)
        out = model.generate(**inputs, do_sample=True, max_new_tokens=6, num_return_sequences=4,
                             suppress_tokens=suppress, pad_token_id=loaded.processor.tokenizer.pad_token_id)
    finally:
        hook.remove()
    return out[:, inputs["input_ids"].shape[1]:]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_no_multimodal_placeholder_can_be_sampled(family):
    loaded = load(f"tiny:{family}")
    ids = placeholder_ids(loaded.processor, loaded.model.config, loaded.family)
    emitted = _emitted_placeholders(loaded)
    assert emitted and emitted <= set(ids), (emitted - set(ids), ids)
    tok = loaded.processor.tokenizer
    for t in (loaded.family.image_token, loaded.family.video_token):
        if t:
            assert tok.convert_tokens_to_ids(t) in ids
    text = set(tok("What digit is this? seven two one", add_special_tokens=False)["input_ids"])
    assert not text & set(ids)  # words stay sampleable
    control = _biased_generation(loaded, sorted(emitted), None)
    assert set(control.flatten().tolist()) & emitted  # the bias works: without suppression they are sampled
    out = _biased_generation(loaded, sorted(emitted), ids)
    assert not set(out.flatten().tolist()) & set(ids)


def _prompts(n=8, answers=None):
    answers = answers or ["seven", "two", "one", "four"]
    rows = [chat_example("What digit is this?", answers[i % len(answers)], [digit_image(i % 4)], label=i % 4) for i in range(n)]
    return prompt_rows(with_row_ids(datasets.Dataset.from_list(rows)))


def test_prompt_rows_keep_images_answer_and_columns():
    p = _prompts(4)
    assert p[0]["prompt"][-1]["role"] == "user" and p[0]["prompt"][0]["content"][0]["type"] == "image"
    assert p["answer"] == ["seven", "two", "one", "four"] and p["label"] == [0, 1, 2, 3] and len(p[0]["images"]) == 1
    assert all(m["role"] != "assistant" for m in p[0]["prompt"])


def test_overlong_prompts_are_refused_or_dropped_never_cut(tmp_path):
    loaded = load("tiny:qwen2_vl")
    small, big = digit_image(0), digit_image(1, (280, 280))  # 30 and 42 prompt tokens with the tiny processor
    rows = [chat_example("What digit is this?", "seven", [small]), chat_example("What digit is this?", "one", [big])]
    prompts = prompt_rows(with_row_ids(datasets.Dataset.from_list(rows)))
    cfg = load_config(base={"model": {"name": "tiny:qwen2_vl"}, "method": "grpo", "grpo": {"max_completion_length": 8,
                      "num_generations": 2}, "train": {"max_length": 43, "batch_size": 2}})
    with pytest.raises(UserError) as e:
        prompt_length_policy(prompts, loaded, cfg, QUIET)
    assert "source rows 1" in e.value.what and "never cut" in e.value.what
    cfg = load_config(base={**cfg.model_dump(mode="json"), "train": {**cfg.train.model_dump(mode="json"), "overlong": "drop"}})
    kept, report = prompt_length_policy(prompts, loaded, cfg, QUIET)
    assert len(kept) == 1 and kept["answer"] == ["seven"] and report["dropped"] == 1
    assert report["dropped_rows"][0]["row"] == 1


def _cfg(tmp_path, **over):
    base = {"model": {"name": "tiny:qwen2_vl"}, "method": "grpo",
            "grpo": {"tuning": "full", "num_generations": 4, "max_completion_length": 6, "rewards": ["exact_match"]},
            "train": {"batch_size": 8, "max_steps": 1, "lr": 1e-2, "logging_steps": 1, "optim": "sgd", "warmup_ratio": 0.0,
                      "scheduler": "constant",
                      "max_grad_norm": 1e9, "precision": "fp32"},
            "output": {"dir": str(tmp_path), "name": "g"}}
    return load_config(base=base, overrides=[f"{k}={v}" for k, v in over.items()])


def _vision_counter(model):
    """Images the Qwen2-VL vision tower runs on (its grid rows), counted at the tower itself."""
    from vlmfit.models.rollout import inner_model

    seen = {"images": 0}

    def hook(module, args, kwargs, out):
        seen["images"] += int(kwargs["grid_thw"].shape[0])

    return seen, inner_model(model).visual.register_forward_hook(hook, with_kwargs=True)


def _train_once(tmp_path, cfg, prompts, rewards_=None, stop_bias: float = 0.0):
    run = RunDir.create(cfg, overwrite=True)
    loaded = load("tiny:qwen2_vl")
    if stop_bias:  # the end of turn made likely: completions of different lengths (in generation and in the loss alike)
        tok = loaded.processor.tokenizer
        stops = sorted({tok.eos_token_id, tok.convert_tokens_to_ids(loaded.family.turn_end)})

        def bias(module, args, out):
            out = out.clone()
            out[..., stops] += stop_bias
            return out

        loaded.model.get_output_embeddings().register_forward_hook(bias)
    start = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    rewards_ = rewards_ or R.rewards_for(cfg.grpo.rewards)
    trainer, facts = make_trainer(loaded, prompts, *rewards_, cfg, run, QUIET)
    seen, hook = _vision_counter(trainer.model)
    torch.manual_seed(0)
    trainer.train()
    hook.remove()
    delta = {n: (p.detach() - start[n]) for n, p in trainer.model.named_parameters() if n in start}
    if facts["shared"] is not None:
        facts["shared"].remove()
    return trainer, facts, seen["images"], delta


def _length_reward():
    """A reward that differs inside every group (completion length), so every group has an advantage."""
    return [R.Reward("tests/grpo_rewards.py:length", "length", {}, "test")], [1.0]


def test_each_image_is_encoded_once_per_forward_not_once_per_completion(tmp_path):
    prompts = _prompts(8)
    plain, _, trl_images, _ = _train_once(tmp_path, _cfg(tmp_path, **{"grpo.share_vision": "false"}), prompts, _length_reward())
    trainer, facts, images, _ = _train_once(tmp_path, _cfg(tmp_path), prompts, _length_reward())
    # one step: 2 prompts x 4 completions; generation (one pre-encoding pass) and the loss forward
    assert trl_images == 2 * 8
    assert images == trl_images // 4
    assert facts["shared"].images_in == trl_images and facts["shared"].images_encoded == images
    # generation suppresses every placeholder, not only config.image_token_id (TRL's own choice)
    expected = placeholder_ids(trainer.processing_class, trainer.model.config, get_family("qwen2_vl"))
    assert trainer.generation_config.suppress_tokens == expected and len(expected) == 4


def test_frozen_tower_features_from_generation_serve_the_loss(tmp_path):
    cfg = _cfg(tmp_path, **{"grpo.tuning": "lora", "lora.scope": "[language]", "train.optim": "adamw"})
    _, facts, images, _ = _train_once(tmp_path, cfg, _prompts(8), _length_reward())
    assert facts["shared"].reuse and images == 2  # encoded at generation only; the loss forward reuses them


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_gradient_accumulation_gives_the_same_update(tmp_path, loss_type):
    prompts = _prompts(8)
    deltas, losses = {}, {}
    for accum in (1, 2, 4):
        cfg = _cfg(tmp_path, **{"train.batch_size": 8 // accum, "train.grad_accum": accum, "grpo.loss_type": loss_type})
        trainer, _, _, delta = _train_once(tmp_path, cfg, prompts, _length_reward(), stop_bias=6.0)
        deltas[accum] = delta
        logged = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
        # completions of different lengths: a per-micro-batch token mean would differ from the batch's
        assert logged[0]["completions/min_length"] < logged[0]["completions/max_length"]
        losses[accum] = logged[0]["loss"]
    moved = [n for n, d in deltas[1].items() if float(d.norm()) > 0]
    assert moved
    flat = {a: torch.cat([deltas[a][n].flatten() for n in moved]) for a in deltas}
    for accum in (2, 4):
        # the whole update (SGD: lr x gradient), relative to its norm: per tensor, the gradients of a group are
        # differences of near-equal terms (advantages sum to zero in a group), where summation order shows up
        diff, size = float((flat[accum] - flat[1]).norm()), float(flat[1].norm())
        assert diff <= 1e-5 * size, (accum, diff, size)
    for a in (2, 4):
        assert abs(losses[a] - losses[1]) <= 1e-5 * abs(losses[1]) + 1e-7, losses


def test_completions_hold_no_prompt_and_no_image_token(tmp_path):
    cfg = _cfg(tmp_path)
    run = RunDir.create(cfg, overwrite=True)
    loaded = load("tiny:qwen2_vl")
    trainer, facts = make_trainer(loaded, _prompts(8), *_length_reward(), cfg, run, QUIET)
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in (0, 0, 0, 0, 1, 1, 1, 1)])
    ids = set(placeholder_ids(loaded.processor, loaded.model.config, loaded.family))
    image_id = loaded.model.config.image_token_id
    assert (batch["prompt_ids"] == image_id).any(dim=1).all()  # every prompt carries its image tokens
    assert not any(int(t) in ids for t in batch["completion_ids"].flatten())
    # the loss reads completion positions only (TRL's logits_to_keep), masked after each completion's end
    assert batch["completion_mask"].shape == batch["completion_ids"].shape
    facts["shared"].remove()


# ------------------------------------------------------------------------------------------------------ rewards

def test_builtin_rewards():
    assert R.exact_match(["seven", " seven ", "Seven"], ["seven"] * 3) == [1.0, 1.0, 0.0]
    assert R.normalised_match(["The Seven.", "seven!"], ["seven", "Seven"]) == [1.0, 1.0]
    assert R.numeric(["it is 41.5", "42", "none"], ["42", "42", "42"], tolerance=0.5) == [1.0, 1.0, 0.0]
    assert R.numeric(["110"], ["100"], tolerance=0.1, relative=True) == [1.0]
    assert R.multiple_choice(["(B) because", "A", "the answer is C."], ["B", "B", "C"]) == [1.0, 0.0, 1.0]
    good = "<think>two strokes</think> <answer>seven</answer>"
    assert R.format_reward([good, "seven", "<answer>seven</answer>"]) == [1.0, 0.0, 0.0]
    assert R.exact_match([good], ["seven"]) == [1.0]  # the <answer> part is what is compared
    assert R.length_penalty(["abc", "a"], target=1, per_char=0.5) == [-1.0, 0.0]


def test_a_failing_reward_stops_with_its_name_and_row():
    raises = R.Reward("tests/grpo_rewards.py:broken", "broken", {}, "grpo.rewards[0]")
    completions = [[{"role": "assistant", "content": "seven"}]] * 2
    with pytest.raises(UserError) as e:
        raises(prompts=None, completions=completions, answer=["a", "b"], source_row=[11, 12])
    assert "reward 'broken' raised ZeroDivisionError" in e.value.what and "11, 12" in e.value.what
    short = R.Reward("tests/grpo_rewards.py:short", "short", {}, "w")
    with pytest.raises(UserError, match="returned 1 values for 2 completions"):
        short(completions=completions, answer=["a", "b"], source_row=[1, 2])
    text = R.Reward("tests/grpo_rewards.py:text", "text", {}, "w")
    with pytest.raises(UserError, match=r"returned 'yes' for source row 2"):
        text(completions=completions, answer=["a", "b"], source_row=[1, 2])
    with pytest.raises(UserError, match="did you mean exact_match"):
        R.resolve("exact_mach", "grpo.rewards[0]")
    with pytest.raises(UserError, match="has no function 'nope'"):
        R.resolve("tests/grpo_rewards.py:nope", "grpo.rewards[0]")


def test_local_normalisation_is_what_the_accumulation_check_catches(tmp_path):
    """bnpo normalises by each micro-batch's own tokens (TRL documents it): with completions of different lengths
    its update under accumulation differs, which is what the check above would see in dapo or grpo if they did."""
    prompts, flat = _prompts(8), {}
    for accum in (1, 4):
        cfg = _cfg(tmp_path, **{"train.batch_size": 8 // accum, "train.grad_accum": accum, "grpo.loss_type": "bnpo"})
        _, _, _, delta = _train_once(tmp_path, cfg, prompts, _length_reward(), stop_bias=6.0)
        flat[accum] = torch.cat([d.flatten() for d in delta.values()])
    assert float((flat[4] - flat[1]).norm()) > 1e-3 * float(flat[1].norm())


def _recipe(tmp_path, digits, name, grpo="", train=""):
    p = tmp_path / f"{name}.yaml"
    p.write_text(f"""\
model: {{name: tiny:qwen2_vl}}
method: grpo
grpo: {{tuning: full, num_generations: 2, max_completion_length: 4{grpo}}}
data: {{source: {digits}, train_limit: 16, eval_limit: 4}}
train: {{max_steps: 6, batch_size: 4, lr: 0.01, warmup_ratio: 0.0, logging_steps: 1, save_steps: 2, seed: 5{train}}}
eval: {{before: true, after: true, modes: [generate]}}
output: {{dir: {tmp_path / 'runs'}, name: {name}}}
""")
    return p


def test_grpo_recipe_end_to_end_with_report(vlmfit, digits, tmp_path):
    rewards = ", rewards: [exact_match, {fn: tests/grpo_rewards.py:uses_columns, weight: 0.5, name: cols}]"
    code, out, err = vlmfit("train", _recipe(tmp_path, digits, "e2e", rewards))
    assert code == 0, err[-3000:]
    run = tmp_path / "runs" / "e2e"
    summary = json.loads((run / "summary.json").read_text())
    g = summary["grpo"]
    assert summary["method"] == "grpo" and summary["steps"] == 6 and g["num_generations"] == 2
    assert [r["name"] for r in g["rewards"]] == ["exact_match", "cols"] and g["rewards"][1]["weight"] == 0.5
    assert g["vision_images"]["encoded"] * 2 == g["vision_images"]["asked"]  # G = 2: half the images encoded
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("rewards/exact_match/mean" in r and "rewards/cols/mean" in r for r in logged if "reward" in r)
    assert (run / "eval_before.json").is_file() and (run / "eval_after.json").is_file() and (run / "model").is_dir()
    report = (run / "report.md").read_text()
    assert "Reward optimisation (GRPO)" in report and "cols (tests/grpo_rewards.py:uses_columns) x 0.5" in report
    assert "encoded by the vision tower" in report
    samples = RunDir(run).samples()
    assert len(samples) == 4 and {"exact_match", "cols"} == set(samples[0]["rewards"])  # the step's 4 completions
    assert all((run / x["image"]).is_file() for x in samples) and samples[0]["answer"] in WORDS
    assert "Sampled completions of the last rollout batch (step 5)" in report  # step 6's rewards, before its update
    html = (run / "report.html").read_text()
    assert html.count("<img alt='train row") == 4 and "Reward optimisation (GRPO)" in html


def test_a_reward_error_is_one_message_and_exit_2(vlmfit, digits, tmp_path):
    code, out, err = vlmfit("train", _recipe(tmp_path, digits, "bad", ", rewards: [tests/grpo_rewards.py:broken]"))
    text = " ".join((out + err).split())
    assert code == 2 and "Traceback" not in text, text[-2000:]
    assert "reward 'broken' raised ZeroDivisionError" in text and "source rows" in text
    code, out, err = vlmfit("train", _recipe(tmp_path, digits, "typo", ", rewards: [exact_mach]"))
    assert code == 2 and "did you mean exact_match" in " ".join((out + err).split())
    assert not (tmp_path / "runs" / "typo").exists()  # refused before any data or run directory


def test_grpo_sigterm_then_resume_ends_with_the_uninterrupted_weights(vlmfit, digits, tmp_path):
    """Rollouts are sampled from the RNG the checkpoint restores: the resumed run samples what the uninterrupted
    one did, and ends with its weights."""
    import signal

    from test_resume import killed_run, max_diff, weights

    code, _, err = vlmfit("train", _recipe(tmp_path, digits, "whole"))
    assert code == 0, err[-2000:]
    proc = killed_run(tmp_path, _recipe(tmp_path, digits, "cut"), 3, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "stopped by SIGTERM after step 3" in " ".join((proc.stdout + proc.stderr).split())
    code, _, err = vlmfit("train", "--resume", tmp_path / "runs" / "cut")
    assert code == 0, err[-2000:]
    assert max_diff(weights(tmp_path / "runs" / "whole", "full"), weights(tmp_path / "runs" / "cut", "full")) <= 1e-6
    rewards = [[r["reward"] for r in RunDir(tmp_path / "runs" / n).metrics() if "reward" in r] for n in ("whole", "cut")]
    assert rewards[0] == pytest.approx(rewards[1], abs=1e-6) and len(rewards[0]) == 6


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
def test_planner_counts_the_kv_cache_generation_really_holds(family):
    """The planner's rollout phase against the cache transformers builds: K and V of every generated sequence at its
    full length, for the tiny model's own layers (Gemma 3: sliding and global layers alike)."""
    from vlmfit.memory.estimate import PlanInputs, _bytes, rollout_memory
    from vlmfit.memory.shape import model_shape

    loaded = load(f"tiny:{family}")
    model = loaded.model.eval()
    coll = VisionChatCollator(loaded.processor, loaded.family)
    ex = chat_example("What digit is this?", "seven", [digit_image(0)])
    inputs = coll.encode([coll.render(ex["messages"][:-1], add_generation_prompt=True)] * 3, [ex["images"]] * 3,
                         padding_side="left")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=5, min_new_tokens=5, return_dict_in_generate=True,
                             pad_token_id=loaded.processor.tokenizer.pad_token_id)
    cache = out.past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    seq = out.sequences.shape[1] - 1  # the last token is sampled from the cache, not stored in it
    inp = PlanInputs(rollouts=3, precision="fp32", weight_dtype="float32", device="cpu")
    shape = model_shape(model.config)
    planned = rollout_memory(shape, inp, _bytes(inp), seq) - 3 * shape.vocab * 8
    assert planned == pytest.approx(held, rel=0.10), (planned, held)


def test_grpo_qlora_trains_adapters_on_a_4bit_base_and_exports(vlmfit, digits, tmp_path):
    p = _recipe(tmp_path, digits, "q4", ", tuning: lora", ", max_steps: 2")
    p.write_text(p.read_text().replace("model: {name: tiny:qwen2_vl}", "model: {name: tiny:qwen2_vl, quantization: 4bit}"))
    code, out, err = vlmfit("train", p)
    assert code == 0, err[-3000:]
    run = tmp_path / "runs" / "q4"
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and not (run / "model").exists()
    code, out, err = vlmfit("export", run, "--out", tmp_path / "merged", "--merge", "--dtype", "fp32")
    assert code == 0, err[-2000:]
    code, out, err = vlmfit("predict", tmp_path / "merged", "--data", digits, "--limit", "2")
    assert code == 0 and "row 0" in out, (out + err)[-2000:]


def test_a_nan_in_training_is_caught_with_its_step(digits, tmp_path, monkeypatch):
    """The divergence guard covers GRPO too: a NaN in the loss forward (generation runs without gradients and
    stays finite) stops the run at that step with a resumable message, not a trained model full of NaN."""
    import vlmfit.train.grpo as grpo
    from vlmfit.train.run import Stopped

    original = grpo.load_start

    def poisoned(*args, **kwargs):
        loaded, start = original(*args, **kwargs)

        def nan_when_training(module, args, out):
            return out * float("nan") if torch.is_grad_enabled() and module.training else out

        # the final norm (TRL computes log-probs through its own fused head, not the head module's forward)
        loaded.model.model.language_model.norm.register_forward_hook(nan_when_training)
        return loaded, start

    monkeypatch.setattr(grpo, "load_start", poisoned)
    cfg = load_config(_recipe(tmp_path, digits, "nan", "", ", max_steps: 3"))
    cfg = load_config(base=cfg.model_dump(mode="json"), overrides=["eval.before=false", "eval.after=false"])
    with pytest.raises(Stopped) as e:
        grpo.train_grpo(cfg, QUIET)
    assert "diverged at step 1" in e.value.what


def test_rewards_read_numbers_and_choices_as_people_write_them():
    # dotted runs (versions, addresses, dates) are no number and never raise; thousands and exponents read right
    assert R.numeric(["1.2.3", "192.168.0.1", "it is 1,234.5", "1e-3", "2024-01-05 is 7"],
                     ["1", "1", "1234.5", "0.001", "7"]) == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert R.multiple_choice(["I think it is B", "A cat: the answer is C", "(b)", "the answer is: (d)", "A"],
                             ["B", "C", "B", "D", "B"]) == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert R.format_reward(["<think>a</think><answer>b</answer> junk <answer>c</answer>"]) == [0.0]
    assert R.exact_match(["seven"], ["<answer>seven</answer>"]) == [1.0]  # tagged references compare by their answer
    clash = R.Reward("numeric", "numeric", {"tolerance": 1.0}, "w")  # an argument named like a column: the recipe's wins
    assert clash(completions=["41"], answer=["42"], tolerance=[0.0], source_row=[0]) == [1.0]
