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
