# Two commands on a fresh CPU machine:  `make run` (main job)  and  `make test` (the suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
ARTIFACTS ?= artifacts

.PHONY: install run test lint clean

$(BIN)/pixart: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so that no later range pulls a CUDA build onto a CPU machine
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[export,dev]"
	touch $@

install: $(BIN)/pixart

# Main job: build and export the embedded default model, then generate a PNG from it.
run: install
	$(BIN)/pixart export --out $(ARTIFACTS)/default
	$(BIN)/pixart generate-local --engine $(ARTIFACTS)/default "a red fox in the snow" --out $(ARTIFACTS)/fox.png

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(ARTIFACTS)
