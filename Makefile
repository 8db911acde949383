# ipop-trio — make venv | deps | test | lint | demo | bench | profile
# `make demo` and `make test` work on a fresh Debian 12 as root: `deps` installs missing
# system tools (apt), `venv` makes .venv and installs the package with its dev extras.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# rustup puts cargo in ~/.cargo/bin, which a non-login shell (CI) may not have on PATH; the
# native core (native/) is built when cargo is found, the pure-Python path is used otherwise.
CARGO_BIN := $(wildcard $(HOME)/.cargo/bin)
ifneq ($(CARGO_BIN),)
export PATH := $(CARGO_BIN):$(PATH)
endif
NATIVE_SRC := native/Cargo.toml $(wildcard native/Cargo.lock native/src/*.rs) setup.py

.PHONY: venv deps test lint demo bench profile root

venv: $(STAMP)

$(STAMP): pyproject.toml $(NATIVE_SRC)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

# Installs iproute2, iperf3, nftables, tcpdump, coturn, ethtool, procps, iputils-ping, make
# and python3-venv, only when one of their tools is missing.
deps:
	@bash .ci/system-deps

# Unit + integration + lab tests; the lab tests need root and are skipped (with the reason)
# otherwise.
test: deps venv
	$(BIN)/pytest -q tests

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy ipop_trio

root:
	@if [ "$$(id -u)" != 0 ]; then \
		echo "this target needs root (network namespaces, veth, TAP): run it as root" >&2; \
		exit 1; \
	fi

demo: root deps venv
	$(BIN)/ipop-trio demo

bench: root deps venv
	@mkdir -p out
	$(BIN)/ipop-trio bench --json out/bench.json

# A 10 s lab profile (two nodes, iperf3 through the overlay, py-spy on both):
# out/profile/report.html, stages.json, NODE/flamegraph.svg, ... (see `ipop-trio profile -h`).
# PROFILE_ARGS adds options, e.g. `make profile PROFILE_ARGS="--scalene --duration 5"`.
profile: root deps venv
	$(BIN)/ipop-trio profile --lab --duration 10 --out out/profile $(PROFILE_ARGS)
