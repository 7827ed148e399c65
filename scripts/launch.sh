#!/usr/bin/env bash
# Single-node gqa-uptrain: one process per local GPU through `accelerate launch`, with the recipe's own
# accelerate config; one plain process when the machine has no GPU.
#
#   scripts/launch.sh recipes/llama-2-7b-gqa8.yaml [key=value ...]
#
# Environment: ACCELERATE_CONFIG (default: the recipe's accelerate_config), NUM_GPUS (default: the GPUs in
# CUDA_VISIBLE_DEVICES if it is set, else every GPU that nvidia-smi lists). The process count always comes from
# here, never from the accelerate config. Running the same command again resumes from the newest checkpoint.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 RECIPE [key=value ...]" >&2
    exit 2
fi
recipe=$1
shift
if [[ ! -f $recipe ]]; then
    echo "$0: $recipe: no such recipe file" >&2
    exit 2
fi
python=${PYTHON:-python3}
if ! "$python" -c 'import gqa_uptrain.train' 2>/dev/null; then
    echo "$0: gqa-uptrain is not installed for $python (pip install -e . in the repository)" >&2
    exit 2
fi
# Validates the recipe (and the overrides) before anything is launched.
config=${ACCELERATE_CONFIG-$("$python" -c 'import sys
from gqa_uptrain.cli import run_cli
from gqa_uptrain.apps.pipeline_recipe import load_pipeline_recipe
run_cli("launch.sh", lambda: print(load_pipeline_recipe(sys.argv[1], sys.argv[2:]).accelerate_config or ""))' "$recipe" "$@")}
if [[ -n ${CUDA_VISIBLE_DEVICES-} ]]; then
    visible=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
else
    visible=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
fi
gpus=${NUM_GPUS:-$visible}

if [[ $gpus -eq 0 ]]; then
    cmd=("$python" -m gqa_uptrain.train "$recipe" "$@")
else
    cmd=(accelerate launch ${config:+--config_file "$config"} --num_processes "$gpus" -m gqa_uptrain.train
         "$recipe" "$@")
fi
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
