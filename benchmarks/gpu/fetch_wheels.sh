#!/usr/bin/env bash
# Fetch the wheels the GPU machine lacks into .whl/ (ignored by git) and pack them into one part
# per device call: .whl/call1/, .whl/call2/. Run here, where pip reaches the package index; the
# versions come from constraints.txt. See benchmarks/gpu/wheels.py for how the set is chosen.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[[ -x $PY ]] || PY=python3
# pip download only, never install: no other torch can reach the development venv this way.
exec "$PY" -m benchmarks.gpu.wheels fetch --dest .whl "$@"
