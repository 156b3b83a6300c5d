# Backflow — every target describes itself: `make help`.
CARGO ?= cargo
QUICKSTART_DIR := .backflow/quickstart

.DEFAULT_GOAL := help
.PHONY: help run test bench crds lint fmt

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

run: ## Run the quick-start sync (SQLite warehouse -> SQLite CRM table); run it twice: the second sends nothing
	@mkdir -p $(QUICKSTART_DIR)
	@test -f $(QUICKSTART_DIR)/warehouse.db || cp examples/quickstart/warehouse.db $(QUICKSTART_DIR)/warehouse.db
	@test -f $(QUICKSTART_DIR)/crm.db || cp examples/quickstart/crm.db $(QUICKSTART_DIR)/crm.db
	$(CARGO) run --quiet -- run -f examples/quickstart/sync.yaml --state-dir .backflow/state

test: ## Run every test (needs PostgreSQL, MariaDB and Redis on 127.0.0.1; .ci/run starts them)
	$(CARGO) test --locked --lib --bins --tests

bench: ## Benchmark planning 1,000,000 PostgreSQL rows against raw COPY (prints figures)
	$(CARGO) bench --locked --bench plan

crds: ## Regenerate crds/ from the Rust types
	$(CARGO) run --quiet -- crds > /dev/null
	BACKFLOW_WRITE_CRDS=1 $(CARGO) test --locked --test crds

lint: ## rustfmt and clippy, warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all
