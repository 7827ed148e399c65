#!/usr/bin/env bash
# Does the project pass its tests with the newest releases of its dependencies, not only the tested ones?
# In a fresh temporary venv: torch==2.13.0, then the project with no constraints (pip takes the newest release
# that pyproject.toml's ranges allow), then "name: old -> new" for every package that moved from constraints.txt,
# then the test suite. Exits with the suite's status. When it passes, refresh constraints.txt from the printed
# versions (pip freeze of that venv, less torch and the project) to move the tested set forward.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
pip install -q torch==2.13.0
pip install -q -e ".[test]"
pip freeze --exclude-editable > "$work/freeze.txt"
echo "== packages that moved from constraints.txt (name: tested -> newest)"
python - constraints.txt "$work/freeze.txt" <<'EOF'
import re
import sys


def pins(path):
    """{normalised name: version} of the `name==version` lines of a requirements file."""
    found = {}
    for line in open(path):
        match = re.match(r"\s*([A-Za-z0-9._-]+)==(\S+)", line)
        if match:
            found[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return found


tested, newest = pins(sys.argv[1]), pins(sys.argv[2])
newest.pop("torch", None)  # pinned by the install command, not by constraints.txt
moved = [f"{name}: {tested.get(name, '(none)')} -> {newest.get(name, '(none)')}"
         for name in sorted(tested.keys() | newest.keys()) if tested.get(name) != newest.get(name)]
print("\n".join(moved) if moved else "none")
EOF
echo "== python -m pytest -q -rs"
python -m pytest -q -rs
