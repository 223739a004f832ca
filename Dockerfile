# The style consumer. Build: docker build -t style-consumer .
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY consumer ./consumer
COPY contracts ./contracts
COPY workflows ./workflows
RUN pip install '.[tracing]' && useradd --system --uid 10001 app && mkdir -p /data/outputs && chown app /data/outputs
USER app
# The sidecar must be reachable from outside the container, so it refuses to start without
# SIDECAR_TOKEN (pass it at run time: docker run -e SIDECAR_TOKEN=...).
ENV WORKFLOWS_DIR=/app/workflows OUTPUT_DIR=/data/outputs SIDECAR_HOST=0.0.0.0 SIDECAR_PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz').status != 200)"
STOPSIGNAL SIGTERM
CMD ["python", "-m", "consumer"]
