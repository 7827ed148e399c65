"""`--help` answers at once for every gqa-* command: nothing heavy is imported before argparse has parsed.

Each command runs in a fresh interpreter (this one has long imported torch), as `python -m MODULE --help` does, and
reports which of the heavy libraries it had imported by the time argparse exited. Imports, not seconds, are asserted:
a timing would be flaky, and these libraries are what made `gqa-publish --help` take 7 to 23 seconds
(docs/benchmarks.md, "Command start-up").
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Seconds each to import, on the 2-core development VM; none may load before the flags are parsed.
HEAVY = ("torch", "transformers", "lm_eval", "datasets", "matplotlib", "accelerate", "safetensors", "tokenizers")
# Still imported for --help by modules these commands share (eval/cache.py, base/source.py: huggingface_hub,
# ~0.1 s); every other command must not import it either.
HUB_BEFORE_PARSING = {"gqa-eval", "gqa-pipeline"}
# The `python -m` form of each command.
MODULES = {"gqa-convert": "gqa_uptrain.convert", "gqa-uptrain": "gqa_uptrain.train", "gqa-eval": "gqa_uptrain.eval",
           "gqa-publish": "gqa_uptrain.apps.publish", "gqa-pipeline": "gqa_uptrain.apps.pipeline",
           "gqa-demo": "gqa_uptrain.apps.demo"}

PROBE = """\
import json, runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as exit:
    code = exit.code
else:
    code = "no exit"
print(json.dumps({"code": code, "loaded": sorted(name for name in sys.modules if "." not in name)}))
"""


def test_every_command_is_covered():
    section = (REPO / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    assert set(re.findall(r"^([\w-]+) =", section, re.M)) == set(MODULES)


@pytest.mark.slow  # a fresh interpreter per command, ~0.1-0.4 s each
@pytest.mark.parametrize("command", sorted(MODULES))
def test_help_imports_nothing_heavy(command):
    result = subprocess.run([sys.executable, "-c", PROBE, MODULES[command]], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    *help_lines, last = result.stdout.splitlines()
    probe = json.loads(last)
    assert probe["code"] == 0
    assert any(line.startswith(f"usage: {command}") for line in help_lines)
    heavy = HEAVY if command in HUB_BEFORE_PARSING else (*HEAVY, "huggingface_hub")
    assert sorted(set(heavy) & set(probe["loaded"])) == []


def _words(text: str) -> str:
    return " ".join(text.split())


def test_readme_and_help_describe_publish_dry_run_alike():
    from gqa_uptrain.apps.publish import parser

    dry_run = next(action for action in parser()._actions if "--dry-run" in action.option_strings)
    assert "nothing is uploaded or written" in dry_run.help
    assert _words(f"`--dry-run`: {dry_run.help}.") in _words((REPO / "README.md").read_text())


def test_readme_names_the_cpu_wheel_index_beside_the_install_command():
    readme = (REPO / "README.md").read_text()
    install = readme.index("pip install torch==2.13.0")
    note = readme.index("--index-url https://download.pytorch.org/whl/cpu")
    assert 0 < note - install < 1500  # right after the setup commands, not somewhere further down
