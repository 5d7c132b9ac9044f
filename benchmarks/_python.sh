# Sourced by the GPU check scripts: PY is the project's environment where there is one, else the
# machine's python3 (a GPU machine has its own CUDA torch) with the sources on the path.
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import beyond_icon" 2>/dev/null; then
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
