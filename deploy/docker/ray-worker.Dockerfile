# syntax=docker/dockerfile:1
# kvstash Ray image, for the Ray head and the workers: an official Ray image (Ray 2.60.0, Python 3.11,
# CUDA runtime in the -gpu variant) with the project installed and the default model pre-pulled into
# /opt/kvstash/models (the chart's config.model.cache_dir). Build from the repository root:
#   GPU: docker build -f deploy/docker/ray-worker.Dockerfile -t kvstash/ray-worker:0.1.0-gpu .
#   CPU: docker build -f deploy/docker/ray-worker.Dockerfile -t kvstash/ray-worker:0.1.0-cpu \
#          --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu \
#          --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# Ray must be the version pyproject.toml pins (ray==2.60.0), so pip keeps the image's Ray.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

# Empty: torch==2.13.0 comes from PyPI, whose Linux x86_64 wheel is the CUDA build (it brings its own CUDA
# libraries; the image provides the driver-facing runtime). The CPU variant passes the CPU wheel index.
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 KVSTASH_MODEL__CACHE_DIR=/opt/kvstash/models

USER root
RUN mkdir -p /opt/kvstash/models /opt/kvstash/src && chown -R 1000:100 /opt/kvstash
# The Ray images' user `ray` (uid 1000, gid 100); numeric so that runAsNonRoot can check it.
USER 1000:100
WORKDIR /opt/kvstash/src
RUN if [ -n "${TORCH_INDEX_URL}" ]; then pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0; fi
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 kvstore ./kvstore
COPY --chown=1000:100 services ./services
RUN pip install . && kvstash --log-level WARNING model pull
WORKDIR /home/ray
