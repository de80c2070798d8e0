# Two commands on a fresh CPU machine:  `make run` (main job)  and  `make test` (the suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
ARTIFACTS ?= artifacts
MODEL := $(ARTIFACTS)/default

.PHONY: install run test test-fast lint bench clean

$(BIN)/pixart: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so that no later range pulls a CUDA build onto a CPU machine
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[export,dev]"
	# fal's JavaScript client for its acceptance test, pinned by tests/js/package-lock.json (where Node.js is)
	if command -v npm >/dev/null 2>&1; then npm ci --prefix tests/js --no-audit --no-fund --silent || \
		echo "npm ci failed: the JavaScript client's acceptance test will try again or skip"; fi
	touch $@

install: $(BIN)/pixart

# re-exported when the committed default weights or the exporter change (a pull that retrains the default, or that
# adds to what an export holds, like the previews' colour map)
$(MODEL)/manifest.json: $(wildcard default_model/weights/*.json default_model/weights/*/* export/*.py export/graphs/*.py) | $(BIN)/pixart
	$(BIN)/pixart export --out $(MODEL) --safety-checker

# Main job: the gRPC service on the embedded default model (exported on first run).
run: install $(MODEL)/manifest.json
	$(BIN)/pixart serve --engine $(MODEL)

test: install
	$(BIN)/python -m pytest -q

# The inner loop: everything but the slow tests (servers on loopback, processes, the `small` config).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .

# Engine vs eager diffusers, side by side in one run; BENCH_ARGS="--config small --sizes 512" for the README's row.
bench: install
	$(BIN)/pixart bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(ARTIFACTS)
