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
# The operator runs trainer pods as settings.runAsUser (1000) and the chart runs the operator as the same UID:
# the images' user must be that number (tests/images checks), so PSS "restricted" needs no override.
ARG KILN_UID=1000

# -- build stages: uv, and Kiln as a wheel with the lock it was tested with ---------------------------------------
FROM ${BASE_IMAGE} AS uv
# Keep in step with the Makefile's UV_VERSION (tests/images checks); the final stages repeat it.
ARG UV_VERSION=0.13.8
# pip trusts the system CA bundle, which tools/images.sh replaces with the host's for RUN steps (a TLS-intercepting
# proxy's CA reaches the build, never an image).
RUN python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install --no-cache-dir --disable-pip-version-check \
       --cert /etc/ssl/certs/ca-certificates.crt "uv==${UV_VERSION}"

FROM uv AS dist
WORKDIR /src
COPY . .
RUN UV_SYSTEM_CERTS=1 UV_PYTHON_DOWNLOADS=never /opt/uv/bin/uv build --wheel --out-dir /dist . \
    && cp pyproject.toml uv.lock tools/image-install.sh /dist/ && mv /dist/image-install.sh /dist/install.sh

# -- what both images share: the base and one non-root user -------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG KILN_UID
RUN groupadd --gid "${KILN_UID}" kiln \
    && useradd --uid "${KILN_UID}" --gid "${KILN_UID}" --home-dir /home/kiln --create-home --shell /usr/sbin/nologin kiln \
    && mkdir -p /var/cache/kiln && chown "${KILN_UID}:${KILN_UID}" /var/cache/kiln
ENV PATH=/opt/kiln/bin:${PATH} PYTHONUNBUFFERED=1 HOME=/home/kiln
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.vendor="Kiln" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/kiln-dev/kiln" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
WORKDIR /home/kiln

# -- the images: one RUN installs uv, then the locked dependencies of one extra and the wheel into /opt/kiln, then
# removes uv and the dist files, so the image holds no uv, pip or sources (only the few-hundred-KB dist COPY layer
# below it, which makes the layer cache key on the wheel and the lock). The environment is one layer: under vfs
# storage (tools/images.sh) every further layer over torch would be another copy of it. ------------------------------
FROM runtime AS operator
ARG KILN_UID
ARG UV_VERSION=0.13.8
ARG UV_CACHE_DIR=/root/.cache/uv
COPY --from=dist /dist /tmp/dist
RUN --mount=type=cache,target=/root/.cache/uv \
    EXTRA=operator UV_VERSION="${UV_VERSION}" UV_CACHE_DIR="${UV_CACHE_DIR}" sh /tmp/dist/install.sh
LABEL org.opencontainers.image.title="kiln-operator" \
      org.opencontainers.image.description="The Kiln operator: TrainingJob and ExportJob controllers (kopf), no torch"
USER ${KILN_UID}:${KILN_UID}
ENTRYPOINT ["kiln", "operator"]

FROM runtime AS trainer
ARG KILN_UID
# albumentations asks PyPI for a newer version on every import (a 2 s timeout where pods have no internet).
ENV NO_ALBUMENTATIONS_UPDATE=1
ARG UV_VERSION=0.13.8
ARG UV_CACHE_DIR=/root/.cache/uv
COPY --from=dist /dist /tmp/dist
RUN --mount=type=cache,target=/root/.cache/uv \
    EXTRA=trainer UV_VERSION="${UV_VERSION}" UV_CACHE_DIR="${UV_CACHE_DIR}" sh /tmp/dist/install.sh
LABEL org.opencontainers.image.title="kiln-trainer" \
      org.opencontainers.image.description="The Kiln trainer and exporter: torch, timm, smp, albumentations, onnxruntime"
USER ${KILN_UID}:${KILN_UID}
ENTRYPOINT ["torchrun"]
CMD ["--nproc-per-node", "1", "-m", "kiln.trainer", "--spec", "/etc/kiln/trainingjob.json"]
