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
RUN /opt/headoni/bin/pip install .

# Final stage: the same Python, the virtualenv, a non-root user, and nothing else.
FROM python:3.11-slim
ENV PATH=/opt/headoni/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 headoni \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin headoni
COPY --from=build /opt/headoni /opt/headoni
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
# uvicorn drains requests for up to 20 s on SIGTERM; give the container longer (compose: stop_grace_period).
STOPSIGNAL SIGTERM
# Python, not curl: the slim image has no curl. urlopen raises, so exits 1, on anything but a 2xx.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["headoni"]
CMD ["serve", "--host", "0.0.0.0"]
