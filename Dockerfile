# syntax=docker/dockerfile:1
#
# Parley image: one image, three roles chosen by the command.
#   docker run parley migrate   apply SQL migrations, create Kafka topics, exit
#   docker run parley worker    Faust worker (lifecycle agent)
#   docker run parley api       webhooks, admin API, dashboard on :8080 (default)
# `parley run` (embedded Kafka + Postgres) is for local development only; don't use it here.
# Kafka and Postgres are separate containers (see deploy/compose.yaml, deploy/k8s/).

# ---- build: install the package and its dependencies into a virtualenv ----
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN python -m venv /opt/parley

WORKDIR /src
# Only what `pip install .` needs: the project file and the packages it lists.
COPY pyproject.toml ./
COPY domain ./domain
COPY channels ./channels
COPY streams ./streams
COPY agents ./agents
COPY api ./api
COPY parley ./parley
RUN /opt/parley/bin/pip install --no-cache-dir .

# ---- runtime ----
FROM python:3.11-slim

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 parley \
 && useradd --system --uid 10001 --gid parley --home-dir /var/lib/parley \
        --no-create-home --shell /usr/sbin/nologin parley \
 && mkdir -p /var/lib/parley \
 && chown parley:parley /var/lib/parley

COPY --from=build /opt/parley /opt/parley

ENV PATH=/opt/parley/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PARLEY_HTTP_HOST=0.0.0.0 \
    PARLEY_HTTP_PORT=8080 \
    PARLEY_DATA_DIR=/var/lib/parley

WORKDIR /var/lib/parley
USER 10001:10001

EXPOSE 8080

# No HEALTHCHECK here: only the api role serves HTTP. deploy/compose.yaml and
# deploy/k8s/parley-api.yaml probe /healthz and /readyz on the api.
ENTRYPOINT ["parley"]
CMD ["api"]
