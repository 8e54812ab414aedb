# syntax=docker/dockerfile:1
# Images of uembed. Targets (docker build --target NAME .):
#   runtime       the default: CPU scoring service, no torch, non-root, healthcheck on /readyz
#   runtime-cuda  the same with onnxruntime-gpu and its CUDA/cuDNN wheels (run with --gpus all)
#   trainer       adds torch (CPU) to train and export bundles; the compose stack builds the demo bundle with it
#   loadtest      adds locust, the load generator of the compose stack
# Every stage runs as the unprivileged user uembed (uid 10001).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment with the serving install ------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/uembed/bin:$PATH
WORKDIR /src
# The install compiles the hashing extension (uembed/contract/_fasthash.pyx) against the system's libxxhash.
# Python's own headers come with the official python images; a Debian-packaged Python (the stand-in base of
# deploy/podman/images.py) takes them from python3.11-dev.
# hadolint ignore=DL3008,SC2046
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libxxhash-dev \
       $(python -c "import pathlib, sysconfig; print('' if pathlib.Path(sysconfig.get_path('include'), 'Python.h').exists() else 'python3.11-dev')") \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/uembed
COPY pyproject.toml README.md ./
COPY uembed ./uembed
RUN pip install --no-cache-dir .

FROM build AS build-cuda
# onnxruntime and onnxruntime-gpu install the same module: swap one for the other. The gpu extra
# (pyproject.toml) brings onnxruntime-gpu with its CUDA and cuDNN wheels and CuPy, which holds
# tier 1 in GPU memory (UEMBED_DEVICE=cuda). Its requirements are read from pyproject.toml (their
# one place): `pip install ".[gpu]"` would also reinstall the CPU onnxruntime of the base
# dependencies, over the same files.
# hadolint ignore=DL3013,SC2046
RUN pip uninstall -y onnxruntime \
    && pip install --no-cache-dir $(python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['gpu'])")

FROM build AS build-trainer
# The CPU wheel of torch (PyPI's default build for Linux carries CUDA: gigabytes): the extra
# index offers torch==<pin>+cpu, which pip prefers to PyPI's build of the same version. Empty:
# no extra index (deploy/podman/images.py, where pip is configured with a local CPU wheel).
# The extras' versions are pinned in pyproject.toml, which hadolint cannot see.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} ".[train]"

FROM build AS build-loadtest
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[loadtest]"

# --- runtime images ------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
# libxxhash0: the library the hashing extension links (the build stage compiled it).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libxxhash0 \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 uembed \
    && useradd --system --uid 10001 --gid uembed --create-home --home-dir /home/uembed uembed \
    && mkdir -p /bundles /home/uembed/.cache/uembed \
    && chown -R uembed:uembed /bundles /home/uembed/.cache
# ORT_DISABLE_TELEMETRY: ONNX Runtime 1.31 otherwise writes a device id and an event database under $HOME.
ENV PATH=/opt/uembed/bin:$PATH \
    ORT_DISABLE_TELEMETRY=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UEMBED_BUNDLE_STORE=/bundles \
    UEMBED_CACHE=/home/uembed/.cache/uembed
WORKDIR /home/uembed
USER 10001:10001

FROM base AS trainer
COPY --from=build-trainer /opt/uembed /opt/uembed
CMD ["uembed", "demo-bundle", "--bundle-store", "/bundles"]

FROM base AS loadtest
COPY --from=build-loadtest /opt/uembed /opt/uembed
COPY --chown=uembed:uembed uembed/loadtest/locustfile.py uembed/loadtest/shapes.py ./
EXPOSE 8089
CMD ["locust", "-f", "locustfile.py", "--host", "http://uembed:8000"]

# What both serving images share: ports (HTTP; the Open Inference Protocol's gRPC), healthcheck, command.
FROM base AS serving
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]
CMD ["uembed", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM serving AS runtime-cuda
COPY --from=build-cuda /opt/uembed /opt/uembed
# The GPU path by default (run with --gpus all); without a usable GPU `serve` stops with a one-line
# error naming what is missing. UEMBED_DEVICE=cpu serves on the CPU with the same image.
ENV UEMBED_DEVICE=cuda

FROM serving AS runtime
COPY --from=build /opt/uembed /opt/uembed
