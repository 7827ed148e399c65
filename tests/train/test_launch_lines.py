"""Launch lines that work on any number of local GPUs: the shipped accelerate configs pin no process count, and
every documented launch line takes the count from the machine (scripts/launch.sh, or a computed --num_processes)."""

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))
DOCUMENTED = [REPO / "README.md", REPO / "train" / "cli.py", *sorted((REPO / "recipes").glob("*.yaml")), *CONFIGS]
LAUNCHER = re.compile(r"(accelerate launch|torchrun|torch\.distributed\.run)(?=\s+-)")
COUNT = re.compile(r"--(?:num_processes|num-processes|nproc_per_node|nproc-per-node)[ =](\S+)")


def commands(text: str) -> list[str]:
    """Each launch command in a file, from the start of its line, continuation lines (`\\`, also in `#` comments)
    joined into one."""
    joined = re.sub(r"\\\n\s*#?\s*", " ", text)
    return [joined[joined.rfind("\n", 0, match.start()) + 1: joined.find("\n", match.start())]
            for match in LAUNCHER.finditer(joined)]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_accelerate_configs_pin_no_process_count(path):
    from accelerate.commands.config.config_args import load_config_from_file

    assert "num_processes" not in yaml.safe_load(path.read_text())
    assert load_config_from_file(str(path)).num_processes == -1  # accelerate launch then insists on the flag


@pytest.mark.parametrize("path", DOCUMENTED, ids=lambda p: str(p.relative_to(REPO)))
def test_documented_launch_lines_count_the_local_gpus(path):
    for command in commands(path.read_text()):
        count = COUNT.search(command)
        assert count, f"{path.name}: `{command}` does not say how many processes (a config's count is not used)"
        value = count.group(1).strip('"')
        cpu_run = "OMP_NUM_THREADS=1 accelerate launch" in command  # a CPU check: its count is no GPU count
        assert value.startswith("$") or cpu_run, f"{path.name}: `{command}` fixes the process count at {value}"


def test_the_readme_and_the_recipes_show_a_launch_that_counts_gpus():
    readme = (REPO / "README.md").read_text()
    assert "scripts/launch.sh recipes/llama-2-7b-gqa8.yaml" in readme
    assert any("$(nvidia-smi -L | grep -c ^GPU)" in command for command in commands(readme))
    for recipe in ("llama-2-7b-gqa8.yaml", "llama-2-7b-mqa.yaml"):
        assert f"scripts/launch.sh recipes/{recipe}" in (REPO / "recipes" / recipe).read_text()


@pytest.fixture
def fake_tools(tmp_path):
    """`accelerate` and a python that print the training command instead of running it; no nvidia-smi."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "accelerate": '#!/bin/sh\necho "accelerate $*"\n',
        "python": f'#!/bin/sh\nif [ "$1 $2" = "-m gqa_uptrain.train" ]; then echo "python $*"; exit 0; fi\n'
                  f'exec {sys.executable} "$@"\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return bin_dir


@pytest.mark.parametrize(("environment", "expected"), [
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, "--num_processes 2 "),
    ({"CUDA_VISIBLE_DEVICES": "3"}, "--num_processes 1 "),
    ({"NUM_GPUS": "8"}, "--num_processes 8 "),
    ({}, None),  # no GPU: one plain process
])
def test_launch_sh_takes_the_count_from_the_machine(fake_tools, environment, expected):
    env = {key: value for key, value in os.environ.items() if key not in {"CUDA_VISIBLE_DEVICES", "NUM_GPUS"}}
    env.update(environment, PATH=f"{fake_tools}:/usr/bin:/bin", PYTHON=str(fake_tools / "python"))
    result = subprocess.run([str(REPO / "scripts" / "launch.sh"), "recipes/llama-2-7b-gqa8.yaml", "train.lr=1e-5"],
                            cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    if expected is None:
        assert line == "python -m gqa_uptrain.train recipes/llama-2-7b-gqa8.yaml train.lr=1e-5"
    else:
        assert line == (f"accelerate launch --config_file recipes/accelerate/fsdp.yaml {expected}-m gqa_uptrain.train "
                        "recipes/llama-2-7b-gqa8.yaml train.lr=1e-5")
