#!/usr/bin/env bash
# Set up everything the tests need, idempotently: Debian's chromium (for the browser test),
# .venv with dreamer_magic installed editable plus its [test] extra, and a check that the
# "Python 3 (dreamer_magic)" kernelspec landed in .venv/share/jupyter/kernels.
#
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -x /usr/bin/chromium ]; then
    echo "setup: installing Debian's chromium"
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi

# torch is pinned in the same command: a bare `torch` requirement could pull a multi-GB CUDA
# build; pyproject keeps the looser `torch>=2.4` for users.
echo "setup: installing dreamer_magic (editable) with its [test] extra"
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]" torch==2.13.0

# The kernelspec is shipped as wheel shared-data (pyproject.toml); make sure it really landed.
spec=.venv/share/jupyter/kernels/python3-dreamer_magic/kernel.json
if [ ! -f "$spec" ]; then
    echo "setup: the kernelspec was not installed: $spec is missing" >&2
    exit 1
fi
.venv/bin/python - <<'PY'
from jupyter_client.kernelspec import KernelSpecManager

spec = KernelSpecManager().get_kernel_spec("python3-dreamer_magic")
assert "--ext" in spec.argv and "dreamer_magic" in spec.argv, spec.argv
print(f"setup: kernelspec {spec.display_name!r} at {spec.resource_dir}")
PY

# One small venv per Python 3.10-3.13 with only what `import dreamer_magic.steps` needs, for the
# golden test of whole-step fingerprints under each interpreter (tests/test_fingerprint_versions.py).
for version in 3.10 3.11 3.12 3.13; do
    venv=".venv-fingerprint/$version"
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import xxhash, filelock" 2>/dev/null; then
        continue
    fi
    base=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$version".*/bin/python 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$base" ]; then base=$(command -v "python$version" || true); fi
    if [ -z "$base" ]; then
        echo "setup: Python $version not found (pyenv or PATH); its fingerprint test skips, or fails under CI" >&2
        continue
    fi
    echo "setup: creating $venv from $base"
    "$base" -m venv --clear "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check xxhash filelock
done
