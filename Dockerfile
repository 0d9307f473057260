# syntax=docker/dockerfile:1
# carbot's images, all from this file (compose.yaml builds them; see docs/operations.md, "Deployment"):
#
#   docker build -t carbot:cpu .                               bots, migrations, a CPU worker (tensorflow-cpu)
#   docker build --build-arg VARIANT=gpu -t carbot:gpu .       GPU workers and the retrain worker (TensorFlow + CUDA)
#   docker build --build-arg VARIANT=serve -t carbot:serve .   a CPU worker without TensorFlow (ONNX / OpenVINO variants)
#   docker build --target dashboard -t carbot:dashboard .      rq-dashboard, with the workers' own RQ
#
# Every dependency is installed pinned and hash-checked from requirements/<variant>.txt
# (regenerate them with requirements/lock.sh); the project itself goes in as a wheel, without
# dependencies of its own choosing. Processes run as the unprivileged user `carbot` (uid 10001).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- the project as a wheel -----------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY requirements/build.txt /tmp/build.txt
RUN pip install --no-cache-dir --require-hashes --no-deps -r /tmp/build.txt
COPY pyproject.toml README.md ./
COPY carbot ./carbot
COPY bots ./bots
COPY worker ./worker
COPY model ./model
COPY training ./training
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels .

# -- what every image shares ----------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 carbot \
    && useradd --system --uid 10001 --gid carbot --create-home --home-dir /home/carbot carbot

# -- rq-dashboard ---------------------------------------------------------------------------------------------------
FROM base AS dashboard
COPY requirements/dashboard.txt /tmp/requirements.txt
RUN pip install --no-cache-dir --require-hashes --no-deps -r /tmp/requirements.txt && rm /tmp/requirements.txt
USER 10001:10001
EXPOSE 9181
# --json: jobs are JSON-serialised (never pickle), so the dashboard must read them that way.
CMD ["rq-dashboard", "--json"]

# -- the application (the default target) ---------------------------------------------------------------------------
FROM base AS app
# cpu: tensorflow-cpu, for the bots (which never import it) and CPU-only workers; gpu: TensorFlow with CUDA;
# serve: no TensorFlow, a CPU worker serving the versions' verified ONNX Runtime / OpenVINO variants.
ARG VARIANT=cpu
COPY requirements/${VARIANT}.txt /tmp/requirements.txt
RUN pip install --no-cache-dir --require-hashes --no-deps -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels \
    && mkdir -p /data /models && chown carbot:carbot /data /models
# The photo store and the model registry live on volumes mounted here (compose.yaml).
# TF_FORCE_GPU_ALLOW_GROWTH: TensorFlow takes GPU memory as it needs it, so two workers can share a GPU.
ENV CARBOT_DATA_DIR=/data \
    CARBOT_MODEL_REGISTRY=/models \
    TF_CPP_MIN_LOG_LEVEL=2 \
    TF_FORCE_GPU_ALLOW_GROWTH=true
USER 10001:10001
WORKDIR /home/carbot
# /metrics, /healthz and /readyz when CARBOT_METRICS_PORT=9100 (compose sets it); 8443: the Telegram webhook.
EXPOSE 9100 8443
CMD ["carbot", "--help"]
