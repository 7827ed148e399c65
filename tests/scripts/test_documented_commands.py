"""Every command line that the docs show for a script in scripts/ uses only flags that the script still has."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "docs" / "benchmarks.md"]
SCRIPTS = sorted((REPO / "scripts").glob("*.py"))


def script_flags(path: Path) -> set[str]:
    return set(re.findall(r"""add_argument\(\s*["'](--[\w-]+)["']""", path.read_text())) | {"--help"}


def documented_commands(text: str) -> list[tuple[str, str]]:
    """(script name, its arguments) for each `scripts/NAME.py ...` in a fenced code block (one command a line,
    `\\` continues a line) or in an inline code span (which may wrap onto the next line)."""
    lines = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.DOTALL):
        lines += re.sub(r"\\\n", " ", block).split("\n")
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    lines += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]
    return [(match.group(1), match.group(2)) for line in lines
            for match in re.finditer(r"scripts/(\w+)\.py((?:(?!scripts/\w+\.py)[^#;&|])*)", line)]


def test_the_parser_sees_the_known_flags():
    assert {"--no-split-kv", "--engines", "--output"} <= script_flags(REPO / "scripts" / "bench_decode.py")
    found = documented_commands("Command: `python scripts/bench_decode.py --engines graph\n--new-tokens 32`")
    assert found == [("bench_decode", " --engines graph --new-tokens 32")]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_documented_script_commands_use_existing_flags(doc):
    flags = {path.stem: script_flags(path) for path in SCRIPTS}
    commands = [(name, args) for name, args in documented_commands(doc.read_text()) if name in flags]
    if doc.name == "benchmarks.md":
        assert {name for name, _ in commands} >= {"bench_decode", "bench_train", "bench_convert"}
    for name, args in commands:
        unknown = [flag for flag in re.findall(r"(?<![\w-])--[\w-]+", args) if flag not in flags[name]]
        assert not unknown, f"{doc.name}: `scripts/{name}.py{args}` uses {unknown}, which scripts/{name}.py lacks"
