# syntax=docker/dockerfile:1
#
# beanstalk-proxy container image.
#
#   docker build -t beanstalk-proxy:0.1.0 .
#   docker run --rm -p 11400:11400 -v /path/to/config:/config:ro -v /path/to/certs:/certs:ro \
#       beanstalk-proxy:0.1.0
#
# deploy/README.md shows it next to beanstalkd (Kubernetes sidecar, docker compose).
#
# Nothing secret is baked in: the image holds only the installed package. The configuration
# (proxy.yaml + acl.yaml) is mounted at /config and the certificates and keys at /certs, both
# read-only. The process runs as uid/gid 10001 (numeric, so Kubernetes' runAsNonRoot can verify
# it) and needs no capability: both ports are above 1024.
#
# The HEALTHCHECK asks the status listener for /healthz on 127.0.0.1:$METRICS_PORT (default
# 9400), so the mounted proxy.yaml must set
#   metrics: {listen: 0.0.0.0:9400}    (or 127.0.0.1:9400 to keep /metrics inside the container)
# and a config with another status port is run with -e METRICS_PORT=<that port>.
# SIGTERM drains connections for up to limits.shutdown_timeout (default 10s): give the
# container a longer stop timeout (docker stop -t / stop_grace_period /
# terminationGracePeriodSeconds). SIGHUP reloads the ACL and the TLS files.
#
# tests/test_container.py reproduces this file's runtime (fresh venv, non-root uid, same
# ENTRYPOINT/CMD and HEALTHCHECK) without a Docker engine; keep the two in step.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------------------------------------
# build: a self-contained virtualenv in /opt/venv (cryptography, PyYAML and uvloop come as
# binary wheels for amd64 and arm64, so no compiler is needed)
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# README* may be absent; the glob keeps COPY from failing (pyproject.toml always matches).
COPY pyproject.toml README* ./
COPY proxy ./proxy
# "./[fast]" is this source tree with the uvloop extra (the same as .[fast]; the ./ form is
# what hadolint recognises as a local path, not an unpinned registry package).
RUN pip install --no-cache-dir "./[fast]" \
    && beanstalk-proxy --version

# ---------------------------------------------------------------------------------------------
# runtime: the slim base, the venv, an unprivileged user; no build tools, no sources
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="beanstalk-proxy" \
      org.opencontainers.image.description="Mutual-TLS, per-tube access-controlled proxy in front of beanstalkd" \
      org.opencontainers.image.licenses="MIT"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    METRICS_PORT=9400

RUN groupadd --system --gid 10001 proxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin proxy \
    && mkdir -p /config /certs

COPY --from=build /opt/venv /opt/venv

# Relative paths in the config resolve against the working directory: with / they land in
# the mounts (config/acl.yaml -> /config/acl.yaml, certs/server.pem -> /certs/server.pem).
WORKDIR /
USER 10001:10001

# 11400: mutual-TLS beanstalkd protocol. 9400: plain HTTP /metrics, /healthz, /readyz.
EXPOSE 11400 9400

# No curl in slim images: the interpreter does the GET. Exit 1 on anything but 200. The exec
# form expands no variables, so the port is read from the environment by the check itself.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = 'http://127.0.0.1:%s/healthz' % os.environ.get('METRICS_PORT', '9400'); sys.exit(0 if urllib.request.urlopen(url, timeout=4).status == 200 else 1)"]

ENTRYPOINT ["beanstalk-proxy"]
CMD ["serve", "--config", "/config/proxy.yaml"]
