"""Where TRL's SFT step time goes at the LM head, measured apart from the rest of the step (issue 29, item 3).

TRL 1.16's SFTTrainer replaces the model's head by `add_fused_lm_head` (trl.kernels.ChunkedLogProbFunction): the
per-token log-probabilities in tiles of 4,096 positions x 32,768 vocabulary entries, plus the entropy and the top-1
flag for its `entropy` / `mean_token_accuracy` logs, at every step. On a device without Triton (this CPU) it scores
*every* position of the batch, prompt and padding included (`compact = _use_triton(device)` in
trl/trainer/utils.py); on a Triton device it scores the labelled positions only. There is no switch for either, so
this benchmark calls TRL's own kernel on the batch the equal-work baseline (`trl-completion` in sft_vs_trl.py)
trains, each way, and vlmfit's head + loss on vlmfit's labels of the same examples:

  trl-cpu                  all positions, log-probs + entropy + top-1   (what trl-completion runs here)
  trl-cpu-no-extras        all positions, log-probs only                (the extras' cost = the difference)
  trl-labelled             labelled positions, log-probs + entropy + top-1 (what TRL runs on a Triton device)
  trl-labelled-no-extras   labelled positions, log-probs only
  vlmfit                   vlmfit's causal-LM head and fp32 cross-entropy at its labelled positions

Forward and backward of the loss (the summed log-probabilities over the labelled tokens) with respect to the final
hidden states; the head weight is frozen (LoRA), as in the end-to-end benchmark. The backbone runs once, untimed.

    python benchmarks/trl_head.py --family gemma-262k --batch 4
    python benchmarks/trl_head.py --family qwen-mixed --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from sft_vs_trl import bench_model, dataset  # noqa: E402

SYSTEMS = ("trl-cpu", "trl-cpu-no-extras", "trl-labelled", "trl-labelled-no-extras", "vlmfit")


def main() -> None:
    import torch
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    from vlmfit.chat.collate import VisionChatCollator
    from vlmfit.models.load import load
    from vlmfit.models.loss import causal_lm_loss

    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=["qwen-mixed", "gemma-262k"], default="gemma-262k")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10, help="timed calls per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load(str(bench_model(args.family)), "float32")
    model = loaded.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    rows = dataset(args.family, args.batch, "train").remove_columns("label")
    trl_batch = DataCollatorForVisionLanguageModeling(loaded.processor, completion_only_loss=True)(
        [{"prompt": ex["messages"][:-1], "completion": ex["messages"][-1:], "images": ex["images"]} for ex in rows])
    ours = VisionChatCollator(loaded.processor, loaded.family)([rows[i] for i in range(len(rows))])
    text = model.config.get_text_config()
    softcap = getattr(text, "final_logit_softcapping", None)
    head = model.get_output_embeddings()

    with torch.no_grad():  # TRL's fused forward: the backbone's last hidden state, shifted against the labels
        inputs = {k: v for k, v in trl_batch.items() if k != "labels"}
        hidden = model.base_model(**inputs, use_cache=False).last_hidden_state[:, :-1]
    labels = trl_batch["labels"][:, 1:]
    mask = labels != -100

    def trl(compact: bool, outputs: tuple[str, ...]):
        h = (hidden[mask] if compact else hidden.reshape(-1, hidden.shape[-1])).detach().requires_grad_()
        t = labels[mask] if compact else labels.clamp(min=0).reshape(-1)
        keep = None if compact else mask.reshape(-1)

        def step():
            logp, *_ = ChunkedLogProbFunction.apply(h, head.weight, head.bias, t, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE,
                                                    softcap, 1.0, outputs)
            loss = -(logp if keep is None else logp[keep]).sum()
            loss.backward()
            h.grad = None
        return step

    class Head(torch.nn.Module):  # vlmfit's loss with the backbone's output given: the head and loss part only
        def __init__(self):
            super().__init__()
            with torch.no_grad():
                inputs = {k: v for k, v in ours.items() if k != "labels"}
                self.h = model.base_model(**inputs, use_cache=False).last_hidden_state.detach()

        def forward(self, logits_to_keep, **_):
            h = self.h.requires_grad_()
            logits = head(h[logits_to_keep])
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            return type("Out", (), {"logits": logits})()

    ours_head = Head()

    def vlmfit():
        loss = causal_lm_loss(ours_head, ours)
        loss.backward()
        ours_head.h.grad = None

    calls = {"trl-cpu": trl(False, ("entropy", "is_top1")), "trl-cpu-no-extras": trl(False, ()),
             "trl-labelled": trl(True, ("entropy", "is_top1")), "trl-labelled-no-extras": trl(True, ()),
             "vlmfit": vlmfit}
    times: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    for s in SYSTEMS:
        calls[s]()  # warm-up
    for _ in range(args.repeats):
        for s in SYSTEMS:  # interleaved
            t0 = time.perf_counter()
            for _ in range(args.iters):
                calls[s]()
            times[s].append((time.perf_counter() - t0) / args.iters * 1000)
    n_all, n_lab = labels.numel(), int(mask.sum())
    n_ours = int((ours["labels"][:, 1:] != -100).sum())
    print(f"\n{args.family}: batch {args.batch}, vocabulary {head.weight.shape[0]:,}, hidden {head.weight.shape[1]}; "
          f"TRL's batch: {n_all} positions, {n_lab} labelled; vlmfit's: {n_ours} labelled; torch threads "
          f"{torch.get_num_threads()}; ms per forward + backward, median of {args.repeats} x {args.iters} calls [min-max]\n")
    print("| head + loss | positions scored | ms per step | vs trl-cpu |")
    print("|---|---:|---:|---:|")
    base = statistics.median(times["trl-cpu"])
    scored = {"trl-cpu": n_all, "trl-cpu-no-extras": n_all, "trl-labelled": n_lab, "trl-labelled-no-extras": n_lab,
              "vlmfit": n_ours}
    for s in SYSTEMS:
        med = statistics.median(times[s])
        print(f"| {s} | {scored[s]} | {med:.1f} [{min(times[s]):.1f}-{max(times[s]):.1f}] | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
