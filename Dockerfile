# syntax=docker/dockerfile:1
# The Headoni tickets API as an image: `docker build -t headoni .`, or `docker compose up` (see
# docker-compose.yml). The image runs `headoni`; its default command serves HTTP on port 8000.

# Build stage: install the project (its wheel holds the migrations as app/sql) into a virtualenv.
# Every dependency ships binary wheels for Linux, so no compiler is needed even here.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/headoni
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY sql ./sql
# Without the [embedded] extra: a container is always given DATABASE_URL, so the embedded PostgreSQL
# (about 73 MB) would be dead weight. So would pip and setuptools once the install is done, and the
# Swagger Editor bundles and source maps of swagger-ui-py (about 19 MB): /docs loads only Swagger UI.
RUN /opt/headoni/bin/pip install . \
    && /opt/headoni/bin/pip uninstall -q -y pip setuptools \
    && find /opt/headoni -path '*/swagger_ui/static/*' \( -name 'swagger-editor*' -o -name '*.map' \) -delete

# Final stage: the same Python, the virtualenv, a non-root user, and nothing else.
FROM python:3.11-slim
# LANG: text is UTF-8 whatever the base image sets (the official one sets this too).
ENV PATH=/opt/headoni/bin:$PATH \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 headoni \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin headoni
COPY --from=build /opt/headoni /opt/headoni
USER 10001:10001
# The only place the image writes: `serve --workers N` keeps its metrics files in a fresh directory
# under $TMPDIR (/tmp); with a read-only root filesystem, mount a tmpfs there (docker-compose.yml does).
WORKDIR /tmp
EXPOSE 8000
# uvicorn drains requests for up to 20 s on SIGTERM; give the container longer (compose: stop_grace_period).
STOPSIGNAL SIGTERM
# Python, not curl: the slim image has no curl. urlopen raises, so exits 1, on anything but a 2xx.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["headoni"]
CMD ["serve", "--host", "0.0.0.0"]
