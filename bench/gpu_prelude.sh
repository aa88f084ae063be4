# Sourced by bench/gpu-*.sh from the repository root: $PY (the project's venv where there is
# one), ecoadapt importable from src/, and bitsandbytes installed (or exit 2 saying how).
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
$PY -c "import ecoadapt" 2>/dev/null || export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import bitsandbytes" || { echo "bitsandbytes is missing: pip install 'ecoadapt[qlora]'"; exit 2; }
