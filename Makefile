# Backflow — every target describes itself: `make help`.
CARGO ?= cargo
QUICKSTART_DIR := .backflow/quickstart
PYTHON ?= python3
# The chart checks' Python tools (helm-python-sdk, kubernetes-validate, jsonschema, pytest).
VENV ?= .venv
# dlt's cursor run of `make bench-dlt` (benches/dlt/requirements.txt).
DLT_VENV ?= benches/dlt/.venv
# Where `make install` puts the binaries.
PREFIX ?= /usr/local

.DEFAULT_GOAL := help
.PHONY: help run install test test-rust test-chart kube venv bench bench-10m bench-100m bench-dlt crds lint doc fmt

help: ## List the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

run: ## Run the quick-start sync (SQLite warehouse -> SQLite CRM table); run it twice: the second sends nothing
	@mkdir -p $(QUICKSTART_DIR)
	@test -f $(QUICKSTART_DIR)/warehouse.db || cp examples/quickstart/warehouse.db $(QUICKSTART_DIR)/warehouse.db
	@test -f $(QUICKSTART_DIR)/crm.db || cp examples/quickstart/crm.db $(QUICKSTART_DIR)/crm.db
	$(CARGO) run --quiet -- run -f examples/quickstart/sync.yaml --state-dir .backflow/state

install: ## Build the release binary; install backflow and its kubectl plugin link kubectl-backflow in $(PREFIX)/bin
	$(CARGO) build --release --locked --bin backflow
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 0755 $${CARGO_TARGET_DIR:-target}/release/backflow $(DESTDIR)$(PREFIX)/bin/backflow
	ln -sf backflow $(DESTDIR)$(PREFIX)/bin/kubectl-backflow

test: test-rust test-chart ## Run every test (needs PostgreSQL, MariaDB, Redis and ClickHouse on 127.0.0.1; .ci/run starts them)

test-rust: kube $(VENV)/.installed ## Run the Rust tests (tests/cluster/ on a real control plane: see `make kube`; its chart test renders with .venv)
	$(CARGO) test --locked --lib --bins --tests

kube: ## Build etcd, kube-apiserver, kube-controller-manager and kubectl 1.20 once (~6-10 min, cached in /var/cache/backflow)
	scripts/kube-control-plane.sh build

test-chart: $(VENV)/.installed ## Check the Helm chart, kustomize config, samples and Argo CD health checks (tests/chart/)
	@command -v lua5.4 >/dev/null || echo "make test-chart: lua5.4 is missing (apt-get install lua5.4; .ci/run does it): the Argo CD check will fail"
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/chart

venv: $(VENV)/.installed ## Create .venv with the pinned Python tools of test-chart

$(VENV)/.installed: tests/chart/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/chart/requirements.txt
	@touch $@

bench: ## Scale benchmark, 1,000,000 PostgreSQL rows: File, Warehouse and ConfigMap stores, plan and end to end, delivery rate, next to raw COPY; the warehouse sources at 100k and 1M rows next to their servers' own speed (BACKFLOW_BENCH_ONLY=sources for those alone)
	$(CARGO) bench --locked --bench scale

bench-10m: ## The same at 1,000,000 and 10,000,000 rows, one run per phase (~15 min on 2 cores, 6 GB free disk)
	BACKFLOW_BENCH_ROWS=1000000,10000000 BACKFLOW_BENCH_REPEAT=1 $(CARGO) bench --locked --bench scale

bench-100m: ## 100,000,000 rows, then 1% changed, File store, one process per run: peak RSS, peak /tmp and plan against COPY (not in CI; ~50 min on 2 cores, ~35 GB free disk for PostgreSQL and /tmp; BACKFLOW_BENCH_ROWS sets another size, BACKFLOW_BENCH_CHANGED_PERCENT and BACKFLOW_BENCH_REMOVED_PERCENT the share of rows changed and deleted, BACKFLOW_BENCH_MODE=mirror sends the deletes)
	BACKFLOW_BENCH_ONLY=huge BACKFLOW_BENCH_ROWS=$${BACKFLOW_BENCH_ROWS:-100000000} $(CARGO) bench --locked --bench scale

bench-dlt: $(DLT_VENV)/.installed ## Cursor mode at 1,000,000 rows next to dlt 1.31's cursor run (sql_database, incremental on updated_at) to the same sink, medians of 3 (not in CI; creates benches/dlt/.venv)
	BACKFLOW_BENCH_ONLY=cursor $(CARGO) bench --locked --bench scale

$(DLT_VENV)/.installed: benches/dlt/requirements.txt
	$(PYTHON) -m venv $(DLT_VENV)
	$(DLT_VENV)/bin/pip install --quiet --disable-pip-version-check -r benches/dlt/requirements.txt
	@touch $@

crds: ## Regenerate crds/ from the Rust types, and their copies in the chart and config/crd
	$(CARGO) run --quiet -- crds > /dev/null
	BACKFLOW_WRITE_CRDS=1 $(CARGO) test --locked --test crds
	BACKFLOW_WRITE_CRDS=1 $(CARGO) test --locked --test chart

lint: ## rustfmt and clippy, warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

doc: ## Build the API documentation (cargo doc --no-deps), warnings as errors
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --locked --no-deps

fmt: ## Format the code
	$(CARGO) fmt --all
