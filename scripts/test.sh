#!/usr/bin/env bash
# Installs the package with its test extra (pinned by constraints.txt), lints it (ruff: pyflakes
# rules; import-linter: the layers of pyproject.toml) and runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
python3 -m ruff check --quiet .
lint-imports --no-cache > /dev/null || lint-imports --no-cache
python3 -m pytest -q "$@"
