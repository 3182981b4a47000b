#!/usr/bin/env bash
# The README's main job: set up .venv if needed, then a short closed-loop Meta-World run of the
# embedded OFT policy through the vLLM engine, unpruned vs VLA-Pruner (keep 0.25), and a short
# bench at OpenVLA-OFT-7B's token layout; one summary (options: vla-pruner demo --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_PLUGINS=vla_pruner MUJOCO_GL=${MUJOCO_GL:-egl}
exec .venv/bin/vla-pruner demo "$@"
