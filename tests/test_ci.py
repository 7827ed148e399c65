"""CI installs the tested versions (constraints.txt) and runs the README's own commands; the README names them."""

import re
from importlib.metadata import requires
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(text: str) -> dict[str, str]:
    """{normalised name: version} of the `name==version` requirements in `text`."""
    return {normalised(name): version for name, version in re.findall(r"^([\w.-]+)==(\S+)", text, re.MULTILINE)}


CONSTRAINTS = pins((REPO / "constraints.txt").read_text())


def readme_commands() -> list[str]:
    """The commands of the README's "Set up and check a fresh machine" block, in order."""
    block = re.search(r"## Set up and check a fresh machine\n+```bash\n(.*?)```", README, re.DOTALL)[1]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readme_commands_with_the_tested_versions():
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == readme_commands()[:2]
    install, test = ci
    assert re.search(r"pip install torch==[\d.]+ && pip install -e \"\.\[test\]\" -c constraints\.txt", install)
    assert test.endswith("python -m pytest -q -rs")  # every skip prints its reason


def test_every_dependency_is_pinned_inside_its_range():
    declared = [Requirement(line) for line in requires("gqa-uptrain")]
    for requirement in declared:
        name = normalised(requirement.name)
        if name == "torch":  # pinned by the install command, before the constraints
            continue
        assert name in CONSTRAINTS, f"{name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(CONSTRAINTS[name]), f"{name}=={CONSTRAINTS[name]} is outside {requirement}"
    assert "gqa-uptrain" not in CONSTRAINTS and "torch" not in CONSTRAINTS


def test_the_readme_names_the_tested_versions():
    line = re.search(r"Tested together \(constraints\.txt\): (.*?)\s\(", README)[1]
    named = dict(item.rsplit(" ", 1) for item in line.split(", "))
    torch = re.search(r"torch==([\d.]+)", readme_commands()[0])[1]
    assert named == {name: torch if name == "torch" else CONSTRAINTS[normalised(name)] for name in named}
    assert set(named) >= {"lm-eval", "transformers", "datasets", "accelerate", "torch"}


def test_the_tests_read_nothing_beside_the_repository():
    """Their data is in tests/data: a clone runs the same tests with or without a `shared` folder beside it."""
    beside = re.compile(r"""parents\[\d+\]\s*/\s*["']shared["']|\.\./shared""")
    readers = [path.relative_to(REPO) for path in (REPO / "tests").rglob("*.py") if beside.search(path.read_text())]
    assert not readers
