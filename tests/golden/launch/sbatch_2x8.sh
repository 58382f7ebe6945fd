#!/bin/bash
#SBATCH --job-name=vlmfit-digits
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --output=slurm-logs/%x-%j.out
#SBATCH --time=0-02:00:00
#SBATCH --partition=gpu

set -euo pipefail
mkdir -p slurm-logs
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=29500
export MASTER_ADDR MASTER_PORT
# one task per node; a task that fails ends the job (no node left waiting in a collective)
srun --kill-on-bad-exit=1 <PYTHON> -m torch.distributed.run \
    --nnodes="$SLURM_NNODES" --nproc-per-node=8 --rdzv-id="$SLURM_JOB_ID" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
    -m vlmfit train <TMP>/r.yaml --set launch.strategy=ddp
