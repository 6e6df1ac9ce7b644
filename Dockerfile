# remedis inference service: one adapted model behind BentoML.
#   remedis run configs/quickstart.yaml -o runs/quickstart          (or any adapted model folder)
#   docker build -t remedis:cpu --build-arg MODEL_DIR=runs/quickstart/adapted/remedis@1 .
#   docker run --rm -p 3000:3000 remedis:cpu
# CUDA variant (PyPI's torch wheels bundle CUDA; run with --gpus all):
#   docker build -t remedis:cuda --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG MODEL_DIR=runs/quickstart/adapted/remedis@1
ARG MODEL_NAME=remedis-quickstart

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BENTOML_HOME=/home/remedis/bentoml \
    REMEDIS_MODEL=${MODEL_NAME}:latest

RUN useradd --create-home --uid 10001 remedis
WORKDIR /app

# Dependencies first (cached layer): torch from the chosen index, the rest from PyPI.
COPY pyproject.toml constraints.txt README.md ./
COPY remedis ./remedis
COPY serving ./serving
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" -c constraints.txt .

COPY --chown=10001:10001 ${MODEL_DIR} /models/adapted
USER 10001
RUN remedis export --model /models/adapted --name "${MODEL_NAME}"

EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:3000/readyz').status != 200)"]
CMD ["bentoml", "serve", "serving.service:RemedisService", "--host", "0.0.0.0", "--port", "3000"]
