"""scripts/launch_slurm.sh under a simulated two-node SLURM allocation on this host.

A fake `srun` starts the script's task once per "node", concurrently, with the variables srun sets per task
(SLURM_NODEID, SLURM_PROCID, SLURM_LOCALID, SLURMD_NODENAME); a fake `scontrol` expands the node list; a fake
`accelerate` records its arguments. The recorded arguments are then resolved by accelerate's and torchrun's own
code into the rendezvous each node would use, and, in the second test, really launched on the CPU with a worker
that joins one gloo process group across both "nodes".
"""

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "launch_slurm.sh"

SRUN = """#!/usr/bin/env bash
# Fake srun: one task per node, all at once, as `srun --ntasks-per-node=1` would start them.
printf '%s\\n' "$@" > "$RECORD/srun.args"
while [[ $1 == -* ]]; do shift; done
pids=()
i=0
for host in $(scontrol show hostnames "$SLURM_JOB_NODELIST"); do
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 SLURMD_NODENAME=$host SLURM_STEP_NUM_NODES=$SLURM_NNODES \\
        "$@" &
    pids+=($!)
    i=$((i + 1))
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""
SCONTROL = """#!/usr/bin/env bash
# Fake scontrol: `show hostnames a,b` prints one host a line (no bracket ranges needed here).
[[ $1 == show && $2 == hostnames ]] || exit 1
tr ',' '\\n' <<<"$3"
"""
ACCELERATE = f"""#!{sys.executable}
# Fake accelerate: records its arguments per node; with WORKER set, runs the real `accelerate launch` with the
# same arguments but WORKER in place of `-m gqa_uptrain.train RECIPE ...`.
import json, os, sys
args = sys.argv[1:]
node = os.environ["SLURM_NODEID"]
with open(os.path.join(os.environ["RECORD"], f"node{{node}}.json"), "w") as f:
    json.dump({{"args": args, "env": {{k: v for k, v in os.environ.items() if k.startswith(("SLURM", "MASTER"))}}}}, f)
if os.environ.get("WORKER"):
    args = args[:args.index("-m")] + [os.environ["WORKER"]]
    os.execv(sys.executable, [sys.executable, "-m", "accelerate.commands.launch", *args[1:]])
"""
WORKER = """import json, os
import torch
import torch.distributed as dist
dist.init_process_group("gloo")
total = torch.tensor([float(dist.get_rank())])
dist.all_reduce(total)
record = {"rank": dist.get_rank(), "world": dist.get_world_size(), "group_rank": int(os.environ["GROUP_RANK"]),
          "node": int(os.environ["SLURM_NODEID"]), "sum": total.item()}
with open(os.path.join(os.environ["RECORD"], f"worker{dist.get_rank()}.json"), "w") as f:
    json.dump(record, f)
dist.destroy_process_group()
"""
# Accelerate's and torchrun's own resolution of one node's `accelerate launch` arguments (no process started).
RESOLVE = """import json, sys
import torch.distributed.run as distrib_run
from accelerate.commands.launch import _filter_args, _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_multi_gpu_env
out = []
for argv in json.loads(sys.argv[1]):
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    assert args.use_fsdp or args.multi_gpu or args.use_deepspeed, "accelerate would not start torchrun"
    prepare_multi_gpu_env(args)
    script = ["--training_script", args.training_script, "--training_script_args", args.training_script_args]
    config, cmd, cmd_args = distrib_run.config_from_args(_filter_args(args, distrib_run.get_args_parser(), script))
    out.append({"nnodes": [config.min_nodes, config.max_nodes], "nproc_per_node": config.nproc_per_node,
                "backend": config.rdzv_backend, "endpoint": config.rdzv_endpoint,
                "rank": config.rdzv_configs.get("rank"), "cmd": [cmd, *cmd_args]})
print(json.dumps(out))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def slurm(tmp_path):
    """Fake srun/scontrol/accelerate on PATH, and a function that runs the script as sbatch would on node 0."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    for name, text in {"srun": SRUN, "scontrol": SCONTROL, "accelerate": ACCELERATE}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)

    def run(nodelist: str, gpus: str, *, port: int, real: bool = False, timeout: float = 120):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM", "MASTER_", "GPUS_PER_NODE", "ACCELERATE", "WORKER"))}
        env.update(PATH=f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin", RECORD=str(record),
                   SLURM_JOB_ID="4242", SLURM_JOB_NODELIST=nodelist, SLURM_NNODES=str(nodelist.count(",") + 1),
                   SLURM_JOB_NUM_NODES=str(nodelist.count(",") + 1), SLURM_NODEID="0", SLURM_GPUS_ON_NODE=gpus,
                   SLURM_NTASKS_PER_NODE="1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        if real:
            env["WORKER"] = str(worker)
        result = subprocess.run(["bash", str(SCRIPT), "recipes/llama-2-7b-gqa8.yaml", "train.lr=1e-5"], cwd=REPO,
                                env=env, capture_output=True, text=True, timeout=timeout, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        nodes = sorted(record.glob("node*.json"))
        return [json.loads(path.read_text()) for path in nodes], record

    return run


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_two_nodes_get_one_rendezvous_and_ranks_0_and_1(slurm):
    port = free_port()
    nodes, record = slurm("gpu-a,gpu-b", "4", port=port)
    assert len(nodes) == 2
    srun = (record / "srun.args").read_text().split("\n")
    assert "--ntasks-per-node=1" in srun and "--ntasks=2" in srun and "--kill-on-bad-exit=1" in srun
    for rank, node in enumerate(nodes):
        args = node["args"]
        assert args[0] == "launch" and node["env"]["SLURM_NODEID"] == str(rank)
        assert flag(args, "--main_process_ip") == "gpu-a"  # the first host of the allocation, on both nodes
        assert flag(args, "--main_process_port") == str(port)
        assert flag(args, "--machine_rank") == str(rank)
        assert flag(args, "--num_machines") == "2"
        assert flag(args, "--num_processes") == "8"  # 2 nodes x the 4 GPUs SLURM gave each
        assert flag(args, "--config_file") == "recipes/accelerate/fsdp.yaml"
        assert args[args.index("-m"):] == ["-m", "gqa_uptrain.train", "recipes/llama-2-7b-gqa8.yaml", "train.lr=1e-5"]

    resolved = json.loads(subprocess.run(
        [sys.executable, "-c", RESOLVE, json.dumps([node["args"][1:] for node in nodes])], cwd=REPO, check=True,
        capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}).stdout)
    for rank, torchrun in enumerate(resolved):
        assert torchrun["nnodes"] == [2, 2] and torchrun["nproc_per_node"] == 4
        assert torchrun["backend"] == "static" and torchrun["endpoint"] == f"gpu-a:{port}"
        assert torchrun["rank"] == rank  # static rendezvous: the machine rank is the node's group rank
        assert torchrun["cmd"][-4:] == ["-m", "gqa_uptrain.train", "recipes/llama-2-7b-gqa8.yaml", "train.lr=1e-5"]


@pytest.mark.slow
def test_two_nodes_on_this_host_really_meet(slurm):
    """The same launch lines, run by the real accelerate (torchrun, static rendezvous) on the CPU: one gloo group of
    2 processes, group rank = SLURM_NODEID."""
    nodes, record = slurm("127.0.0.1,localhost", "1", port=free_port(), real=True)
    assert len(nodes) == 2
    workers = [json.loads((record / f"worker{rank}.json").read_text()) for rank in range(2)]
    for rank, worker in enumerate(workers):
        assert worker == {"rank": rank, "world": 2, "group_rank": rank, "node": rank, "sum": 1.0}


def test_no_gpu_is_refused_before_srun(slurm, tmp_path):
    with pytest.raises(AssertionError, match="no GPU on this node"):
        slurm("gpu-a,gpu-b", "0", port=free_port())
    assert not (tmp_path / "record" / "srun.args").exists()
