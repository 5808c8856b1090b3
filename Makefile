# Setup is this file's job: `make demo` and `make test` work on a fresh machine with nothing installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

# Re-installs only when the dependency list changes; the package itself is editable.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

demo: install
	$(BIN)/synthwatch demo
	SYNTHWATCH_DATA_DIR=$${SYNTHWATCH_DATA_DIR:-.synthwatch}/demo $(BIN)/synthwatch report --out report.html --since 35d
	@echo "Report for people without Grafana: report.html (open it in a browser)."


test: install lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not integration" $(PYTEST_ARGS)

# mypy cannot see setuptools' package-dir mapping through the editable install, so it checks a
# symlinked view of the installed layout (synthwatch/schemas -> schemas/, ...).
TYPECHECK := build/typecheck
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/synthwatch
	@for f in synthwatch/*; do ln -s ../../../$$f $(TYPECHECK)/synthwatch/; done
	@ln -sfn ../../../schemas $(TYPECHECK)/synthwatch/schemas
	@ln -sfn ../../../producers $(TYPECHECK)/synthwatch/producers
	@ln -sfn ../../../stream_apps $(TYPECHECK)/synthwatch/stream_apps
	@ln -sfn ../../../deploy/clickhouse/migrations $(TYPECHECK)/synthwatch/migrations
	@ln -sfn ../../../dashboards $(TYPECHECK)/synthwatch/dashboards
	cd $(TYPECHECK) && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p synthwatch

bench: install
	$(BIN)/synthwatch bench publish

clean:
	rm -rf $(VENV) .synthwatch build *.egg-info .pytest_cache .mypy_cache .ruff_cache
