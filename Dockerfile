# The consumer image. torch's CUDA wheels carry the CUDA runtime and cuDNN, so a slim Python
# base runs on a GPU host with the NVIDIA container toolkit (and on the CPU elsewhere).
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY streams streams
COPY reid reid
COPY sinks sinks
RUN pip install .

FROM python:3.11-slim-bookworm
RUN useradd --create-home --uid 10001 reid
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    REID_METRICS_HOST=0.0.0.0 \
    REID_METRICS_PORT=9108
# Mount trained weights here and set REID_WEIGHTS_PATH=/models/ensemble.pt
RUN mkdir /models && chown reid /models
USER reid
EXPOSE 9108
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9108/metrics', timeout=4)"
ENTRYPOINT ["reid-stream"]
CMD ["run"]
