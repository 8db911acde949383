# ipop-trio — make venv | deps | test | lint | fuzz | fuzz-short | fuzz-native | demo | bench | profile
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

.PHONY: venv deps test lint lint-native fuzz fuzz-short fuzz-native fuzz-native-short demo bench profile root

venv: $(STAMP)

$(STAMP): pyproject.toml $(NATIVE_SRC)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	@$(BIN)/python -c 'import ipop_trio.datapath.native as n; \
		print("native core:", "built" if n.AVAILABLE else "NOT built, " + n.WHY)'
	@touch $@

# Installs iproute2, iperf3, nftables, tcpdump, coturn, ethtool, procps, iputils-ping, make,
# bind9-dnsutils (dig) and python3-venv, only when one of their tools is missing.
deps:
	@bash .ci/system-deps

# Unit + integration + lab tests; the lab tests need root and are skipped (with the reason)
# otherwise.
test: deps venv
	$(BIN)/pytest -q tests

lint: venv lint-native
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy ipop_trio

# The native core: rustfmt, clippy, its unit tests (linked against the venv's Python).
# Without cargo it is skipped, unless IPOP_TRIO_REQUIRE_NATIVE=1 (CI) makes that an error.
lint-native: venv
	@if ! command -v cargo >/dev/null; then \
		echo "lint-native: cargo is not on PATH: native core not checked" >&2; \
		test "$$IPOP_TRIO_REQUIRE_NATIVE" != 1; \
	else \
		cd native && export PYO3_PYTHON=$(abspath $(BIN)/python) && \
		cargo fmt --check && cargo clippy --all-targets -- -D warnings && cargo test -q; \
	fi

# Fuzz every native function that reads network bytes (native/src/fuzzing.rs).
# `fuzz-native`: cargo-fuzz (libFuzzer; needs `cargo install cargo-fuzz`, and RUSTC_BOOTSTRAP
# stands in for nightly), FUZZ_RUNS inputs per target from a seed corpus of valid traffic.
# `fuzz-native-short`: the same targets for a few seconds as plain cargo tests (CI).
FUZZ_RUNS ?= 1000000
FUZZ_TARGETS := open_batch reassembler tap_reads open_one
FUZZ_ENV := RUSTC_BOOTSTRAP=1 PYO3_PYTHON=$(abspath $(BIN)/python)
fuzz-native: venv
	cd native && IPOP_FUZZ_SEEDS=$(abspath native/fuzz/corpus) PYO3_PYTHON=$(abspath $(BIN)/python) \
		cargo test -q write_seed_corpus
	cd native/fuzz && for t in $(FUZZ_TARGETS); do \
		$(FUZZ_ENV) cargo fuzz run -O $$t -- -runs=$(FUZZ_RUNS) -print_final_stats=1 || exit 1; \
	done

fuzz-native-short: venv
	cd native && IPOP_FUZZ_MS=750 PYO3_PYTHON=$(abspath $(BIN)/python) \
		cargo test -q --release fuzz_smoke -- --nocapture

# Fuzz every `*_untrusted` entry point and the signalling server core (fuzz/targets.py) with
# atheris: each target in its own process for FUZZ_RUNS inputs, from a seed corpus of valid
# traffic (kept and grown in out/fuzz/corpus); report in out/fuzz/report.json, crashing
# inputs in out/fuzz/corpus/crashes/, exit 1 on a crash. Here (2 shared cores) 1M inputs
# take 5 s (stun_parse) to ~15 min (signalling_server): the whole `make fuzz` about 1 h.
# `fuzz-short`: 20k inputs per target (CI), under 2 minutes.
fuzz: venv
	$(BIN)/python -m fuzz.run --runs $(FUZZ_RUNS) $(FUZZ_ARGS)

fuzz-short: venv
	$(BIN)/python -m fuzz.run --runs 20000 --report out/fuzz/short.json --corpus out/fuzz/short-corpus

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
