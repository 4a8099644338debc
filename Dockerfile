# Kaizen for GPU hosts: vLLM on CUDA. Build: docker build -t kaizen .
# Run:   docker run --gpus all -p 8000:8000 -v kaizen-data:/data kaizen
# The bundled model is prepared on first start into the /data volume (a no-op afterwards);
# set KAIZEN_MODEL to a mounted Hugging Face directory to serve another model.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    KAIZEN_HOME=/data \
    KAIZEN_HOST=0.0.0.0 \
    KAIZEN_PORT=8000 \
    PATH=/opt/venv/bin:$PATH

# Ubuntu's python3 is whatever the base image ships; pinning it would break on base updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 1000 kaizen \
    && mkdir -p /data && chown kaizen:kaizen /data

WORKDIR /app
# Dependencies first, so a source change does not reinstall vLLM.
COPY pyproject.toml README.md ./
RUN mkdir -p server trainer && touch server/__init__.py trainer/__init__.py \
    && pip install -e '.[gpu,train]'
COPY alembic.ini ./
COPY alembic ./alembic
COPY server ./server
COPY trainer ./trainer
# The executability check the trainer runs in its sandbox is the CI client's (standard library).
COPY plugins/common ./plugins/common
RUN pip install --no-deps ./plugins/common
COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh

USER 1000:1000
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["kaizen", "serve"]
