# netplug: `make test` and `make demo` work on a fresh Debian machine, as root.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Debian packages the tests and the demo use: the kernel tools and a ping.
DEB_PACKAGES := nftables libnftables1 iptables iproute2 iputils-ping curl procps python3-venv

.PHONY: all test lint typecheck pytest demo demo-netns plugin deps system-deps clean

all: test

system-deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(BIN)/netplug: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

deps: system-deps $(BIN)/netplug

lint: deps
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

typecheck: deps
	@mkdir -p build/typing && ln -sfn ../../backends build/typing/netplug_backends
	$(BIN)/mypy

pytest: deps
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pytest

test: lint typecheck pytest

# The Docker walkthrough: build, registry, dockerd, install, network, containers, cleanup.
demo: deps
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m tests.demo_docker

# The same on bare namespaces, playing dockerd's part over the socket (no Docker needed).
demo-netns: deps
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m tests.demo

# ./plugin (config.json + rootfs/) from the Dockerfile; BASE_IMAGE=<ref> to build on a
# registry image instead of the local debootstrap base.
plugin: deps
	$(BIN)/python -m tests.dockerenv plugin

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build plugin *.egg-info
