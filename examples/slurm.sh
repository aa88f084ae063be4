#!/usr/bin/env bash
# Data-parallel ecoadapt on a Slurm allocation: one torchrun per node, 4 GPUs per node.
#SBATCH --job-name=ecoadapt
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --time=02:00:00
set -euo pipefail

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=4

srun torchrun \
  --nnodes "$SLURM_NNODES" \
  --nproc-per-node 4 \
  --rdzv-backend c10d \
  --rdzv-endpoint "$head_node:29500" \
  --rdzv-id "$SLURM_JOB_ID" \
  -m ecoadapt adapt my-run.yaml --set parallel.strategy=fsdp
