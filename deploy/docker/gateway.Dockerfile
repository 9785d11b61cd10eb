# syntax=docker/dockerfile:1
# kvstash gateway image: `kvstash up` against a Ray cluster (ray.address) and a Redis (redis.url). It never
# loads the model (the Ray workers do). Build from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t kvstash/gateway:0.1.0 .
# Python must match the Ray image's (3.11): Ray Client refuses a different minor version.
FROM python:3.11.13-slim-bookworm

# The gateway imports no worker code, so no torch, transformers, numba or numpy: it installs only what it
# imports (gateway-requirements.txt, pins equal to pyproject.toml's), then the project without its
# dependencies. The worker actors it creates run in the Ray image, which has the full package.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /tmp/kvstash
COPY deploy/docker/gateway-requirements.txt ./
RUN pip install -r gateway-requirements.txt
COPY pyproject.toml README.md ./
COPY kvstore ./kvstore
COPY services ./services
RUN pip install --no-deps . && cd / && rm -rf /tmp/kvstash

RUN useradd --uid 10001 --user-group --create-home --home-dir /home/kvstash kvstash
USER 10001:10001
WORKDIR /home/kvstash
ENV KVSTASH_HOME=/home/kvstash/.kvstash KVSTASH_GATEWAY__HOST=0.0.0.0
EXPOSE 50051 9464
ENTRYPOINT ["kvstash"]
CMD ["up"]
