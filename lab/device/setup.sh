# Sourced by the device entry points of this folder: go to the repository's root, install the
# carried wheels (.whl/*.whl: fla-core, ...) into /tmp/site, and put both on PYTHONPATH.
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}
