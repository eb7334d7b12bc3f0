# syntax=docker/dockerfile:1.7
# Kiln's two images from one lock (uv.lock, the same pins the tests run with):
#   operator  slim, no torch: `kiln operator` (the Helm chart's Deployment)
#   trainer   torch, timm, segmentation-models-pytorch, albumentations, onnxruntime: `torchrun ... -m kiln.trainer`
#             (the operator renders the command; the exporter pods run `python -m kiln.trainer.export` in it too)
#
#   docker build --target operator -t ghcr.io/kiln-dev/kiln-operator:0.1.0 .
#   docker build --target trainer -t ghcr.io/kiln-dev/kiln-trainer:0.1.0 .
#   make images      # the same with buildah, no daemon and no registry (tools/images.sh)
#
# BASE_IMAGE is any Debian-like image with python3 (3.11 to 3.13) and the venv module; the build and the final
# stages share it, so the virtual environment's interpreter link holds. No compiler is needed: every locked
# dependency is a wheel.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim

# -- uv, in the build stages only ------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS uv
# Keep in step with the Makefile's UV_VERSION (tests/images checks).
ARG UV_VERSION=0.13.8
# tools/images.sh lends the host's uv cache here instead of the cache mount below.
ARG UV_CACHE_DIR=/root/.cache/uv
# pip and uv trust the system CA bundle, which tools/images.sh replaces with the host's for the RUN steps (a
# TLS-intercepting proxy's CA reaches the build, never an image).
ENV UV_CACHE_DIR=${UV_CACHE_DIR} UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1 UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/kiln UV_NATIVE_TLS=1 PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"
WORKDIR /src
COPY pyproject.toml uv.lock ./

# -- Kiln itself, as a wheel both images install (no sources, no editable install) -----------------------------
FROM uv AS wheel
COPY . /src
RUN /opt/uv/bin/uv build --wheel --out-dir /wheels /src

# -- one virtual environment per image, under /opt/kiln: the locked dependencies, then the wheel ------------------
FROM uv AS operator-env
RUN --mount=type=cache,target=/root/.cache/uv \
    /opt/uv/bin/uv sync --frozen --no-install-project --extra operator
COPY --from=wheel /wheels /wheels
RUN /opt/uv/bin/uv pip install --python /opt/kiln/bin/python --no-deps /wheels/*.whl

# One RUN, so torch and its CUDA libraries are one layer: every further layer over them would be another copy
# under vfs storage (tools/images.sh), and a cached dependency layer saves little once uv's cache is warm.
FROM uv AS trainer-env
COPY --from=wheel /wheels /wheels
RUN --mount=type=cache,target=/root/.cache/uv \
    /opt/uv/bin/uv sync --frozen --no-install-project --extra trainer \
    && /opt/uv/bin/uv pip install --python /opt/kiln/bin/python --no-deps /wheels/*.whl

# -- what both images share: the base, one non-root user, no uv, pip or sources ---------------------------------
FROM ${BASE_IMAGE} AS runtime
# The operator runs trainer pods as settings.runAsUser (1000) and the chart runs the operator as the same UID:
# the image's user must be that number (tests/images checks), so PSS "restricted" needs no override.
ARG KILN_UID=1000
ARG VERSION=0.1.0
ARG REVISION=unknown
RUN groupadd --gid "${KILN_UID}" kiln \
    && useradd --uid "${KILN_UID}" --gid "${KILN_UID}" --home-dir /home/kiln --create-home --shell /usr/sbin/nologin kiln \
    && mkdir -p /var/cache/kiln && chown "${KILN_UID}:${KILN_UID}" /var/cache/kiln
ENV PATH=/opt/kiln/bin:${PATH} PYTHONUNBUFFERED=1 HOME=/home/kiln
LABEL org.opencontainers.image.vendor="Kiln" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/kiln-dev/kiln" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
WORKDIR /home/kiln
USER ${KILN_UID}:${KILN_UID}

# The virtual environment comes last in each image: a layer after it would copy it again under vfs storage.
FROM runtime AS operator
LABEL org.opencontainers.image.title="kiln-operator" \
      org.opencontainers.image.description="The Kiln operator: TrainingJob and ExportJob controllers (kopf), no torch"
ENTRYPOINT ["kiln", "operator"]
COPY --from=operator-env /opt/kiln /opt/kiln

FROM runtime AS trainer
LABEL org.opencontainers.image.title="kiln-trainer" \
      org.opencontainers.image.description="The Kiln trainer and exporter: torch, timm, smp, albumentations, onnxruntime"
ENTRYPOINT ["torchrun"]
CMD ["--nproc-per-node", "1", "-m", "kiln.trainer", "--spec", "/etc/kiln/trainingjob.json"]
COPY --from=trainer-env /opt/kiln /opt/kiln
