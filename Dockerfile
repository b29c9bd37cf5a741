# syntax=docker/dockerfile:1
# trustmgr's container image, for the Helm chart in charts/trustmgr.
#
#   docker build -t registry.example.com/trustmgr:0.1.0 .
#
# The base is pinned by digest; to move to a newer build of the same tag:
#   docker buildx imagetools inspect python:3.11-slim-bookworm
ARG PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

# --- build: the wheel, and a virtual environment with it and its extras -------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY trustmgr/ trustmgr/
COPY providers/ providers/
# Dependencies only as binary wheels: nothing is compiled, so no compiler is needed here
# or ends up in the image.
RUN python3 -m pip wheel --no-deps --wheel-dir /wheels . \
 && python3 -m venv /opt/trustmgr \
 && /opt/trustmgr/bin/pip install --only-binary=:all: \
        "$(ls /wheels/trustmgr-*.whl)[kubernetes,vault,aws,daemon]" \
 && /opt/trustmgr/bin/pip uninstall --yes pip setuptools \
 && /opt/trustmgr/bin/trustmgr --version

# --- the image: the base's Python, the environment, a user that is not root ----
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="trustmgr" \
      org.opencontainers.image.description="Multi-cluster trust and certificate manager for Istio" \
      org.opencontainers.image.licenses="Apache-2.0"
# pip is not needed to run trustmgr: the base's goes too.
RUN python3 -m pip uninstall --yes --quiet pip setuptools wheel \
 && echo "trustmgr:x:65532:65532::/home/trustmgr:/usr/sbin/nologin" >> /etc/passwd \
 && echo "trustmgr:x:65532:" >> /etc/group \
 && mkdir -p /home/trustmgr \
 && chown 65532:65532 /home/trustmgr \
 && chmod 0755 /home/trustmgr
COPY --from=build /opt/trustmgr /opt/trustmgr
ENV PATH=/opt/trustmgr/bin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/home/trustmgr \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /home/trustmgr
USER 65532:65532
ENTRYPOINT ["trustmgr"]
CMD ["--help"]
