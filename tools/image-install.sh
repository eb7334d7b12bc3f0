#!/bin/sh
# The Dockerfile's install step, run as root in a final stage from /tmp/dist (the wheel, pyproject.toml, uv.lock):
# uv into a throwaway venv, the locked dependencies of $EXTRA and the wheel into /opt/kiln, then uv and the dist
# files removed, all in one RUN so no layer keeps them. pip and uv trust the system CA bundle (tools/images.sh
# lends the host's for the build).
set -eu
cd /tmp/dist
python3 -m venv /tmp/uv
/tmp/uv/bin/pip install --quiet --no-cache-dir --disable-pip-version-check --cert /etc/ssl/certs/ca-certificates.crt \
    "uv==${UV_VERSION}"
export UV_PROJECT_ENVIRONMENT=/opt/kiln UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1 UV_PYTHON_DOWNLOADS=never \
    UV_SYSTEM_CERTS=1
/tmp/uv/bin/uv sync --frozen --no-install-project --extra "$EXTRA"
/tmp/uv/bin/uv pip install --python /opt/kiln/bin/python --no-deps ./kiln-*.whl
rm -rf /tmp/uv /tmp/dist
