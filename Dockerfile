# syntax=docker/dockerfile:1.7
# The consumer image: CUDA runtime base, Python 3.11 (python-build-standalone via uv, since
# the CUDA images ship another Python), pinned dependencies, non-root, weights baked in when
# the build can reach them. Build: `docker compose build` or
#   docker build -t deer-reid-stream --build-arg WEIGHTS_URL=https://.../ensemble.pt .
#   docker build -t deer-reid-stream --build-arg WEIGHTS_SET="imagenet megadescriptor-t" .
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.8.15

FROM ${UV_IMAGE} AS uv

# --- build: interpreter, virtual environment, pinned dependencies, the project -------------
FROM ${CUDA_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1 \
    UV_NO_CACHE=1
RUN uv python install 3.11 && uv venv --python 3.11 /opt/venv
WORKDIR /src
# Dependencies first: this layer (torch and CUDA libraries, ~5 GB) survives code changes.
COPY requirements.lock ./
# TORCH_INDEX=https://download.pytorch.org/whl/cpu installs the CPU-only build of the pinned
# torch/torchvision pair instead of the CUDA one and leaves the CUDA libraries out (the image of
# docker-compose.cpu.yml, with CUDA_IMAGE=ubuntu:24.04). Empty: exactly requirements.lock.
ARG TORCH_INDEX=""
RUN if [ -z "$TORCH_INDEX" ]; then \
        uv pip install --python /opt/venv/bin/python --no-deps -r requirements.lock; \
    else \
        grep -vE '^(nvidia-|cuda-|triton==|torch==|torchvision==)' requirements.lock > /tmp/cpu.lock \
        && uv pip install --python /opt/venv/bin/python --no-deps -r /tmp/cpu.lock \
        && uv pip install --python /opt/venv/bin/python --no-deps --index-url "$TORCH_INDEX" \
           $(grep -E '^(torch|torchvision)==' requirements.lock); \
    fi
COPY pyproject.toml README.md ./
COPY streams streams
COPY reid reid
COPY sinks sinks
RUN uv pip install --python /opt/venv/bin/python --no-deps .

# --- weights: baked in when reachable, else the image still builds ----------------------
FROM build AS weights
# A trained ensemble checkpoint ('reid-ensemble/1', see reid/weights.py), if you have one.
ARG WEIGHTS_URL=""
# Pretrained sets pulled with `reid-stream weights pull` (verified, into the torch hub and
# Hugging Face caches under /opt/reid), space-separated names from `reid-stream weights list`;
# "imagenet" gives the default ensemble its torchvision trunks. Empty = none. Without network
# the step says which file to place where and the image starts from the seeded weights.
ARG WEIGHTS_SET="imagenet"
# A mirror of the publishers (REID_WEIGHTS_BASE_URL), for builds without internet access.
ARG WEIGHTS_BASE_URL=""
ENV TORCH_HOME=/opt/reid/torch HF_HOME=/opt/reid/hf
RUN mkdir -p /opt/reid/weights /opt/reid/torch /opt/reid/hf \
 && if [ -n "$WEIGHTS_URL" ]; then \
        /opt/venv/bin/python -c "import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], '/opt/reid/weights/ensemble.pt')" "$WEIGHTS_URL"; \
    fi \
 && for name in $WEIGHTS_SET; do \
        REID_WEIGHTS_BASE_URL="$WEIGHTS_BASE_URL" /opt/venv/bin/reid-stream weights pull "$name" --no-progress \
        || echo "WARNING: weights $name not pulled at build time; see the line above"; \
    done

# --- runtime ---------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS runtime
RUN groupadd --system --gid 10001 reid \
 && useradd --system --uid 10001 --gid reid --home-dir /home/reid --create-home reid \
 && mkdir /models && chown reid:reid /models
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
COPY --from=weights /opt/reid /opt/reid
COPY deploy/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TORCH_HOME=/opt/reid/torch \
    HF_HOME=/opt/reid/hf \
    REID_METRICS_HOST=0.0.0.0 \
    REID_METRICS_PORT=9108 \
    REID_LOG_FORMAT=json
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/reid
EXPOSE 9108
# Liveness: the process answers on its operations port (readiness is /readyz).
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('REID_METRICS_PORT', '9108'), timeout=4)"]
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["run"]
