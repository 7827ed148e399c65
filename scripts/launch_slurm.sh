#!/usr/bin/env bash
# Multi-node gqa-uptrain under SLURM: one `accelerate launch` per node, each starting one process per GPU.
#
#   sbatch --nodes 4 scripts/launch_slurm.sh recipes/llama-2-7b-gqa8.yaml [key=value ...]
#
# Environment: ACCELERATE_CONFIG (default recipes/accelerate/fsdp.yaml), GPUS_PER_NODE (default: the GPUs SLURM
# gave this node, else every GPU nvidia-smi lists; sbatch --gpus-per-node N overrides the 8 below),
# MASTER_PORT (default 29500). The accelerate config's num_machines / num_processes / machine_rank are
# overridden from the allocation. Rendezvous is static: the first node of the allocation (machine rank 0, the
# SLURM_NODEID of its task) hosts the store at MASTER_ADDR:MASTER_PORT and node i is machine rank i.
# Resubmitting the same command resumes from the newest checkpoint.
#SBATCH --job-name=gqa-uptrain
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: sbatch --nodes N $0 RECIPE [key=value ...]" >&2
    exit 2
fi

ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-recipes/accelerate/fsdp.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}}
MASTER_PORT=${MASTER_PORT:-29500}
NNODES=${SLURM_NNODES:-1}
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
if [[ ! $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]]; then
    echo "$0: no GPU on this node (SLURM_GPUS_ON_NODE unset, nvidia-smi lists none): set GPUS_PER_NODE" >&2
    exit 2
fi
export MASTER_ADDR MASTER_PORT ACCELERATE_CONFIG GPUS_PER_NODE NNODES

# SLURM_NODEID differs per node, so it is expanded inside the task, not here. One task per node whatever
# --ntasks the job was given: each task's accelerate launch starts that node's GPUS_PER_NODE processes.
srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 bash -c '
    exec accelerate launch \
        --config_file "$ACCELERATE_CONFIG" \
        --num_machines "$NNODES" \
        --num_processes $((NNODES * GPUS_PER_NODE)) \
        --machine_rank "$SLURM_NODEID" \
        --main_process_ip "$MASTER_ADDR" \
        --main_process_port "$MASTER_PORT" \
        --rdzv_backend static \
        -m gqa_uptrain.train "$@"
' gqa-uptrain "$@"
