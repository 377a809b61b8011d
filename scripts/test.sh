#!/usr/bin/env bash
# Installs the package with its test extra (pinned by constraints.txt) and runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
python3 -m pytest -q "$@"
