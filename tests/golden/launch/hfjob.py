# /// script
# requires-python = ">=3.10"
# dependencies = ["vlmfit==0.1.0"]
# ///
"""vlmfit run digits: written by `vlmfit launch --hf-jobs`; trains the recipe below and uploads the run
directory to https://huggingface.co/me/vlmfit-runs (also when training stops early)."""

from pathlib import Path

RECIPE = '''\
model:
  name: tiny:qwen2_vl
  revision: null
  dtype: auto
  quantization: none
  double_quant: true
  min_pixels: null
  max_pixels: null
  max_soft_tokens: null
  trust_remote_code: false
  allow_pickle: false
data:
  source: builtin:mnist
  task: classification
  image_column: null
  video_column: null
  question_column: null
  answer_column: null
  label_column: null
  chosen_column: null
  rejected_column: null
  messages_column: null
  classes: null
  prompt: null
  system: null
  val_fraction: 0.1
  test_fraction: 0.1
  split_seed: 0
  strict: false
  max_image_pixels: 64000000
  video_fps: 2.0
  video_max_frames: 16
  frames_per_example: null
  train_limit: null
  shots_per_class: null
  eval_limit: null
method: lora
lora:
  r: 16
  alpha: 32.0
  dropout: 0.05
  targets: all-linear
  scope:
  - language
  train_fully: []
dpo:
  tuning: lora
  beta: 0.1
  loss_type: sigmoid
  label_smoothing: 0.0
  init_from: null
  pairs_from_labels: null
zo:
  optimizer: sharpzo
  target: auto
  forward_passes: 4000
  lr: 0.001
  eps: 0.001
  perturbations: 1
  ctx_init: a photo of a
  n_ctx: null
  intrinsic_dim: 512
  generations: 100
  popsize: 40
  sigma: 0.4
  rho: 0.1
  population_batch: null
  sparsity: 0.5
  outlier_threshold: 3.0
  eval_every: 500
train:
  epochs: 1.0
  max_steps: null
  batch_size: 8
  grad_accum: 1
  lr: 0.0002
  scheduler: cosine
  warmup_ratio: 0.03
  weight_decay: 0.0
  max_grad_norm: 1.0
  max_length: null
  overlong: truncate
  loss_on: assistant
  lean_loss: true
  precision: auto
  gradient_checkpointing: []
  optim: adamw
  seed: 42
  logging_steps: 10
  dataloader_workers: 0
  group_by_length: false
  packing: false
  pack_tokens: null
  processor_cache: true
  cache_image_features: true
  feature_cache_gib: 4.0
  save_steps: 200
  save_total_limit: 2
  on_divergence: stop
  divergence_grad_norm: null
eval:
  before: true
  after: true
  modes:
  - constrained
  - generate
  batch_size: 32
  max_new_tokens: 8
launch:
  strategy: ddp
output:
  dir: /tmp/runs
  name: digits
  save_model: true
'''


def main():
    recipe = Path("/tmp/recipe.yaml")
    recipe.write_text(RECIPE)
    import subprocess, sys
    code = subprocess.call([sys.executable, '-m', 'vlmfit', 'train', str(recipe)])
    run = Path("/tmp/runs") / 'digits'
    if run.is_dir():
        from huggingface_hub import HfApi

        api = HfApi()  # the token comes from the HF_TOKEN secret
        api.create_repo('me/vlmfit-runs', private=True, exist_ok=True)
        api.upload_folder(repo_id='me/vlmfit-runs', folder_path=str(run), path_in_repo='digits')
        print("run directory uploaded to https://huggingface.co/me/vlmfit-runs/tree/main/digits")
    raise SystemExit(code)


if __name__ == "__main__":
    main()
