# Sourced by every sbatch wrapper here (and by your login shell, if you like): the one pinned
# Python module and the project's environment. Set VQLP_VENV (or VQLP_CONDA_ENV) once in ~/.bashrc.
#   export VQLP_VENV=/N/project/<your project>/venvs/vqlp      # project space, not /N/scratch
# `module avail python/gpu` lists the versions; the line below is the one the docs and
# cluster/bigred200/slurm.yaml (setup:) use (tests/test_cluster.py checks that they agree).
VQLP_MODULE="python/gpu/3.11.5"
if command -v module >/dev/null 2>&1; then
  module load "$VQLP_MODULE"
else
  echo "env.sh: no 'module' command on $(hostname) (not Big Red 200?): using the Python on PATH" >&2
fi
if [ -n "${VQLP_CONDA_ENV:-}" ]; then
  conda activate "$VQLP_CONDA_ENV"
elif [ -n "${VQLP_VENV:-}" ]; then
  if [ ! -f "$VQLP_VENV/bin/activate" ]; then
    echo "env.sh: VQLP_VENV=$VQLP_VENV has no bin/activate (create it: see docs/cluster.md)" >&2
    return 1 2>/dev/null || exit 1
  fi
  # shellcheck disable=SC1091
  source "$VQLP_VENV/bin/activate"
fi
python -c "import pipeline" 2>/dev/null || {
  echo "env.sh: 'import pipeline' fails with $(command -v python): activate the environment (VQLP_VENV) and pip install -e ." >&2
  return 1 2>/dev/null || exit 1
}
