#!/usr/bin/env bash
# The plugin on the lowest Snakemake it supports (the floor of `snakemake` in pyproject.toml's
# test extra; the main .venv has the newest release under its ceiling): a second virtualenv,
# .venv-lowest, and the tests that meet Snakemake itself. Run scripts/setup.sh first (apt).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
lowest=$("$python" - <<'PY'
import re, tomllib
extra = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]
[floor] = [m[1] for r in extra if (m := re.fullmatch(r"snakemake>=([0-9.]+),.*", r))]
print(floor)
PY
)
[ -x .venv-lowest/bin/python ] || "$python" -m venv .venv-lowest
.venv-lowest/bin/python -m pip install -q --upgrade pip
.venv-lowest/bin/python -m pip install -q -e '.[test]' "snakemake==$lowest"
installed=$(.venv-lowest/bin/python -c "import snakemake; print(snakemake.__version__)")
echo "lowest Snakemake: $installed (floor $lowest)"
# What meets Snakemake: its private internals, real jobs read into requests, a whole run
# (the demo), progress under --quiet, the options in --help, the resident runner, a failed
# job's report, and storage mode through S3 (Snakemake's storage registry).
.venv-lowest/bin/python -m pytest -p no:cacheprovider \
    tests/test_snakemake_internals.py \
    tests/test_resources.py \
    tests/test_demo.py \
    tests/test_progress.py \
    tests/test_first_hour_defaults_in_help.py \
    tests/test_first_hour_remote_runner.py \
    tests/test_first_hour_remote_errors.py \
    tests/test_storage_mode.py \
    "$@"
