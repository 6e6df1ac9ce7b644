# remedis inference service: one adapted model behind BentoML (see README, "The service").
#   remedis run configs/quickstart.yaml -o runs/quickstart          (or any adapted model folder)
#   docker build -t remedis:cpu --build-arg MODEL_DIR=runs/quickstart/adapted/remedis@1 .
#   docker run --rm -p 3000:3000 remedis:cpu
# CUDA variant: PyPI's torch wheels (CUDA bundled) and serving/serving-cuda.yaml (gpu: 1, AMP):
#   docker build -t remedis:cuda --build-arg VARIANT=cuda --build-arg MODEL_DIR=... .
#   docker run --rm --gpus all -p 3000:3000 remedis:cuda
# API key: add `auth: {enabled: true}` to the serving config and pass -e REMEDIS_API_KEY=... at run time.
# The same image runs the DICOM gateway (docs/gateway.md), with its config and certificates mounted read-only
# and its spool on a volume (the gateway's health endpoint replaces the service's check):
#   docker run --rm -p 11112:11112 -v /etc/remedis:/etc/remedis:ro -v remedis-spool:/var/lib/remedis \
#     -e REMEDIS_GATEWAY_API_KEY=... --health-cmd 'python -c "import urllib.request as u; u.urlopen(\"http://127.0.0.1:8043/healthz\")"' \
#     remedis:cpu remedis-gateway serve --config /etc/remedis/gateway.yaml --set spool=/var/lib/remedis/spool
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG VARIANT=cpu
ARG MODEL_DIR=runs/quickstart/adapted/remedis@1
ARG MODEL_NAME=remedis-quickstart

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BENTOML_HOME=/home/remedis/bentoml \
    BENTOML_DO_NOT_TRACK=true \
    REMEDIS_MODEL=${MODEL_NAME}:latest \
    REMEDIS_SERVE_CONFIG=/app/serving/serving-${VARIANT}.yaml

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN useradd --create-home --uid 10001 remedis \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/remedis
WORKDIR /app

# Dependencies first (cached layer): torch from the CPU index or PyPI (CUDA), the rest from PyPI.
COPY pyproject.toml constraints.txt README.md ./
COPY remedis ./remedis
COPY serving ./serving
RUN case "${VARIANT}" in \
      cpu) index=https://download.pytorch.org/whl/cpu; cp serving/serving.yaml serving/serving-cpu.yaml ;; \
      cuda) index=https://pypi.org/simple ;; \
      *) echo "VARIANT must be cpu or cuda, got ${VARIANT}" >&2; exit 2 ;; \
    esac \
    && pip install --extra-index-url "${index}" -c constraints.txt .

COPY --chown=10001:10001 ${MODEL_DIR} /models/adapted
USER 10001
RUN remedis export --model /models/adapted --name "${MODEL_NAME}"

EXPOSE 3000 11112
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:3000/readyz').status != 200)"]
CMD ["bentoml", "serve", "serving.service:RemedisService", "--host", "0.0.0.0", "--port", "3000"]
