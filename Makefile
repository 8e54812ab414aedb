# Set-up and everyday commands. Everything installs into .venv with pip: torch is pinned
# to 2.13.0, the CPU wheel pip finds on this machine (uv and poetry would download CUDA).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-deps build-deps demo test stack loadtest images compose-up compose-down clean
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# The install compiles uembed/contract/_fasthash.pyx (the hashing contract's per-value work in C), which
# links the system's libxxhash: its header comes first (Debian's libxxhash-dev), and a C compiler.
BUILD_PACKAGES := libxxhash-dev gcc libc6-dev
build-deps:
	@[ -f /usr/include/xxhash.h ] && command -v gcc >/dev/null || { \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(BUILD_PACKAGES); }

$(STAMP): pyproject.toml uembed/contract/_fasthash.pyx uembed/model/_rows.pyx uembed/serving/pipeline/_pool.pyx uembed/bundle/_ranges.pyx uembed/bundle/_ranges_kernel.h uembed/serving/protocols/_infer_wire.pyx uembed/serving/protocols/_score_json.pyx | build-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[train,dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests use. Servers the tests and `make stack` start on their own loopback
# ports (never the machine's own instances): redis-server, prometheus and haproxy (in front of
# the service's replicas: `uembed stack --replicas N`). wrk loads the HTTP fronts in
# `uembed bench --peers`, h2load (nghttp2-client) its gRPC front; valgrind counts a request's
# instructions (scripts/request-instructions.py, scripts/decode-instructions.py: figures a noisy
# machine does not move). The images and the
# compose stack (`make images`, tests/deploy): podman with runc (crun fails on hosts with hybrid
# cgroups), netavark and aardvark-dns (compose services find each other by name), iptables (netavark's
# firewall driver: without it a compose network cannot start), debootstrap
# (the base image, where no image registry is reachable), libb64-0d (Triton's perf_analyzer links it:
# tests/serving/protocols/test_perf_analyzer.py), libxxhash-dev (the hashing extension: build-deps above).
SYSTEM_PACKAGES := redis-server prometheus haproxy wrk nghttp2-client podman runc netavark aardvark-dns iptables debootstrap libb64-0d \
	libxxhash-dev valgrind
system-deps:
	@for tool in redis-server prometheus /usr/sbin/haproxy wrk h2load valgrind callgrind_control podman runc /usr/sbin/iptables debootstrap /usr/lib/podman/netavark /usr/lib/podman/aardvark-dns; do \
	  command -v $$tool >/dev/null || missing=1; done; dpkg -s libb64-0d >/dev/null 2>&1 || missing=1; [ -f /usr/include/xxhash.h ] || missing=1; [ -z "$$missing" ] || { \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES); }

# The main job on the embedded default: serve the demo bundle (MovieLens-100K, unified
# embedding at 10%, trained and exported the first time) on http://127.0.0.1:8000.
# No Redis or other service needed.
demo: $(STAMP)
	$(BIN)/uembed serve

# The suite on TEST_WORKERS processes (pytest-xdist): a file, or the container tests, stays on one worker.
TEST_WORKERS ?= 2
test: $(STAMP) system-deps
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

# The local stack without Docker: redis-server, the service (demo bundle) and prometheus on
# 127.0.0.1 ports 6380, 8000 and 9090, in the foreground until Ctrl-C (uembed stack --help).
stack: $(STAMP) system-deps
	$(BIN)/uembed stack

# 60 s of locust against the service on 127.0.0.1:8000 (e.g. `make stack` in another terminal);
# reports in loadtest-results/. More options: .venv/bin/uembed loadtest --help
loadtest: $(STAMP)
	$(BIN)/uembed loadtest --seconds 60

# Every image docker-compose.yml uses, built with podman: the Dockerfile's runtime, trainer and
# loadtest targets, and (where podman has no image of those names) stand-ins for redis and
# prometheus from Debian packages, on a debootstrapped base (deploy/podman/images.py explains).
# `make images TARGETS=runtime-cuda` builds the CUDA image (gigabytes of CUDA wheels).
images: $(STAMP) system-deps
	$(BIN)/python deploy/podman/images.py $(TARGETS)

# The compose stack under podman-compose (redis, the demo bundle job, the service, prometheus,
# locust; Grafana only with Docker: see README), after `make images`. compose-down keeps the
# volumes (the demo bundle): `$(BIN)/python deploy/podman/compose.py down -v` drops them.
compose-up: $(STAMP)
	$(BIN)/python deploy/podman/compose.py up

compose-down: $(STAMP)
	$(BIN)/python deploy/podman/compose.py down

# Also Cython's output beside the .pyx sources (the editable install's build), so the next install compiles afresh.
clean:
	rm -rf $(VENV) runs .pytest_cache .stack loadtest-results build
	rm -f uembed/contract/_fasthash.c uembed/model/_rows.c uembed/serving/pipeline/_pool.c uembed/bundle/_ranges.c uembed/serving/protocols/_infer_wire.c uembed/serving/protocols/_score_json.c
	find uembed -name '*.so' -delete
