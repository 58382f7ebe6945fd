"""Scaling out on existing engines: the launch verb (torchrun / accelerate, DeepSpeed, FSDP2, Slurm, job services)
and what a launched training process needs to know about its rank (ranks.py)."""
