# DINOv2 Embed: one image for the RunPod serverless worker (default) and the gRPC server.
#   docker build --platform linux/amd64 --build-arg MODEL=facebook/dinov2-small -t USER/dinov2-embed:TAG .
#   docker run --gpus all USER/dinov2-embed:TAG                                    # RunPod worker
#   docker run --gpus all -p 50051:50051 USER/dinov2-embed:TAG python -m server    # gRPC server
#   --build-arg RAY_VERSION=2.60.0 adds Ray Data: the same image then runs `python -m offline` on a Ray cluster.
FROM pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime

ARG MODEL=facebook/dinov2-small
ARG MODEL_REVISION=main
ARG RAY_VERSION=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/tmp/hf

WORKDIR /app

# Dependencies first: rebuilt only when the pins change.
COPY deploy/requirements.txt deploy/requirements.txt
RUN pip install --no-cache-dir -r deploy/requirements.txt \
    && if [ -n "${RAY_VERSION}" ]; then pip install --no-cache-dir "ray[data]==${RAY_VERSION}"; fi \
    && useradd --create-home --uid 10001 --user-group embed

# Weights next, baked in at build time: rebuilt only when the model or the download step changes.
COPY server/__init__.py server/errors.py server/download.py server/
RUN python -m server.download --model "${MODEL}" --revision "${MODEL_REVISION}" --out /opt/model

# The project itself last.
COPY pyproject.toml README.md runpod_handler.py test_input.json ./
COPY protos/ protos/
COPY server/ server/
COPY client/ client/
COPY offline/ offline/
RUN pip install --no-cache-dir --no-deps .

USER 10001:10001

# At run time the Hub is never contacted: the model is the baked folder, named in answers as the Hub id it came from.
ENV MODEL_ID=/opt/model \
    SERVED_MODEL_NAME=${MODEL} \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    RUNPOD_LOG_LEVEL=INFO \
    PORT=50051 \
    METRICS_PORT=9090

EXPOSE 50051 9090

# gRPC mode: healthy while SERVING. RunPod mode: always healthy (RunPod watches its workers).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "server.healthcheck"]

CMD ["python", "-u", "runpod_handler.py"]
