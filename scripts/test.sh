#!/usr/bin/env bash
# Installs the package with its test extra (pinned by constraints.txt), lints it (ruff: pyflakes
# rules; import-linter: the layers of pyproject.toml) and runs the suite in two processes of one
# thread each (pytest-xdist, a test file per process at a time: its module fixtures are built once;
# the longest files first, as tests/conftest.py orders them).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
python3 -m ruff check --quiet .
lint-imports --no-cache
python3 -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder "$@"
