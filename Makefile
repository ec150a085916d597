# kata-lifecycle-manager
#
#   make demo    watch a fleet of 5 simulated nodes upgrade node by node, then roll back
#   make test    everything CI runs: format, clippy, unit tests, end-to-end tests, chart tests
#
# Both run on a local control plane built from Go modules (tests/tools/install.sh, cached in
# ~/.cache/kata-lifecycle-manager/tools; KLM_TOOLS_DIR=<dir> uses binaries you already have).
# Needs: Rust (cargo), Go (for the first tools build), python3, openssl, curl.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
# Steps of `make test` run in the order written, even under `make -j`.
.NOTPARALLEL:

CARGO ?= cargo
PYTHON ?= python3
# Threads per end-to-end test binary. Each binary shares one control plane between its tests;
# 2 fits a 2-core machine running that control plane too.
E2E_THREADS ?= 2

.PHONY: help demo test bench deps tools build images fmt fmt-check clippy unit e2e chart-test \
        cluster-up cluster-down cluster-status test-e2e-env bench-fleet

help: ## this list
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

demo: tools build ## upgrade 4 of 5 simulated nodes to 3.28.0, then fail 3.29.0 on the 3rd and roll back
	$(CARGO) run --quiet -p klm-demo

test: deps tools fmt-check clippy build unit e2e chart-test ## everything: fmt, clippy, unit, end-to-end and chart tests
	@echo "make test: all passed"

deps: ## check (and on Debian as root, install) what the scripts need besides Rust and Go
	@missing=(); \
	for c in openssl curl setpriv setsid base64 faketime; do command -v $$c >/dev/null || missing+=($$c); done; \
	if (( $${#missing[@]} )); then \
	  if [[ $$(id -u) == 0 ]] && command -v apt-get >/dev/null; then \
	    echo "deps: installing $${missing[*]} (openssl curl util-linux coreutils faketime)"; \
	    apt-get update -qq && apt-get install -y -qq openssl curl util-linux coreutils faketime >/dev/null; \
	  else echo "deps: missing $${missing[*]}: install openssl, curl, util-linux, coreutils, faketime (libfaketime: the fault tests shift agents' clocks)" >&2; exit 1; fi; \
	fi
	@command -v $(PYTHON) >/dev/null || { echo "deps: $(PYTHON) is needed (tests/cluster, tests/chart)" >&2; exit 1; }
	@$(PYTHON) -c 'import yaml' 2>/dev/null || { echo "deps: installing PyYAML for the chart tests"; \
	  $(PYTHON) -m pip install --quiet --disable-pip-version-check pyyaml; }
	@if [[ -z "$${KLM_TOOLS_DIR:-}" ]] && ! command -v go >/dev/null; then \
	  echo "deps: Go is needed to build the control-plane tools once (or set KLM_TOOLS_DIR to a directory with etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok, helm)" >&2; exit 1; fi
	@# The real node of the e2e tests (tests/cluster/real-node.sh): containerd, runc, CNI plugins.
	@if ! command -v containerd >/dev/null || ! command -v runc >/dev/null || [[ ! -x /usr/lib/cni/bridge ]]; then \
	  if [[ $$(id -u) == 0 ]] && command -v apt-get >/dev/null; then \
	    echo "deps: installing containerd runc containernetworking-plugins (the real-node test)"; \
	    apt-get update -qq && apt-get install -y -qq containerd runc containernetworking-plugins >/dev/null; \
	  else echo "deps: missing containerd, runc or the CNI plugins: install Debian's containerd, runc, containernetworking-plugins (the real-node test needs them, and root)" >&2; exit 1; fi; \
	fi
	@command -v gcc >/dev/null || { echo "deps: gcc is needed (the real-node test's images)" >&2; exit 1; }
	@$(CARGO) fmt --version >/dev/null 2>&1 || rustup component add rustfmt
	@$(CARGO) clippy --version >/dev/null 2>&1 || rustup component add clippy

tools: deps ## build (cold: ~17 min) or reuse the control-plane tools
	@bash tests/tools/install.sh >/dev/null

build: ## build the binaries (klm-agent, klm-coordinator, kubectl-kata_lifecycle, klm-demo)
	$(CARGO) build --bins

images: tools ## the agent and coordinator images (+ the real-node test's) as OCI archives in target/images, no daemon
	bash docker/build-images.sh

fmt: ## format the code
	$(CARGO) fmt --all

fmt-check: ## check formatting (cargo fmt --check)
	$(CARGO) fmt --all -- --check

clippy: ## clippy on every target, warnings are errors
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit: ## unit tests (no cluster)
	$(CARGO) test --workspace --exclude klm-e2e

e2e: tools build images ## end-to-end tests: each test binary starts its own control plane
	$(CARGO) test -p klm-e2e --no-fail-fast -- --test-threads=$(E2E_THREADS)

bench: tools ## benchmark: per-node orchestration overhead and API requests per node on 10 simulated nodes
	$(CARGO) build --release --bins
	KLM_BIN_DIR=$(CURDIR)/target/release $(CARGO) bench -p klm-e2e --bench orchestration

bench-fleet: tools ## fleet benchmark: one upgrade over 100, 300 and 1000 simulated nodes, one agent process each (KLM_FLEET_SIZES=100,300 to choose)
	$(CARGO) build --release --bins
	KLM_BIN_DIR=$(CURDIR)/target/release $(CARGO) bench -p klm-e2e --bench fleet

chart-test: tools ## helm lint and rendering checks of charts/kata-lifecycle-manager
	bash tests/chart/test.sh

cluster-up: tools ## start a control plane in the background (KLM_NODES=3 nodes; KLM_CLUSTER_DIR=/tmp/klm-cluster; KLM_REAL_NODE=real-node adds the real node, as root, after make images)
	bash tests/cluster/cluster.sh up

cluster-down: ## stop it
	bash tests/cluster/cluster.sh down

cluster-status: ## its components, ports and memory (RSS)
	bash tests/cluster/cluster.sh status

# Attaches to the cluster of `make cluster-up` when one is running; otherwise each test binary
# starts (and ends) its own, as in `make e2e`.
test-e2e-env: tools build images ## run the end-to-end tests against the cluster of `make cluster-up` (or their own)
	if bash tests/cluster/cluster.sh status >/dev/null 2>&1; then eval "$$(bash tests/cluster/cluster.sh env)"; fi; \
	$(CARGO) test -p klm-e2e --no-fail-fast -- --test-threads=$(E2E_THREADS)
