# Setup is this file's job: `make demo` and `make test` work on a fresh machine with nothing installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CORE   := build/core/manifest.json
CORE_SOURCES := $(addprefix stream_apps/detect/,alerting.py replay.py spikes.py novelty.py region.py compiled.py)
PYTEST_ARGS ?=
# The suite runs in this many pytest processes (pytest-xdist; 1: one process, no xdist). Most integration tests
# wait on a broker, a worker or an engine in child processes: one process kept ~1.2 of 2 cores busy
# (1,308 CPU s over the run). Each process has its own session broker and engine (tests/conftest.py);
# tests share no file or topic (tmp_path, topics and groups of their own); ports are picked by the OS, and a broker
# whose port another process took in between fails with that reason rather than serve the other listener.
# worksteal: each process starts with half the tests in order and takes the other's remaining ones when done.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist worksteal)

.PHONY: install core demo test test-fast lint bench clean constraints

install: $(STAMP) $(CORE)

# Re-installs only when the dependency list changes; the package itself is editable. Every dependency is
# held to the version in constraints.txt (tested together): a new release reaches us only by `make constraints`.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

# The detection core compiled with mypyc into build/core (never beside the sources), rebuilt when one of its
# sources changes. At import, stream_apps/detect/compiled.py loads it only if every source still has the hash
# it was built from; otherwise the pure modules run, with a one-line warning (see that module). A failed build
# (mypyc refusing new code) does not stop the install: the old build is removed, the pure modules run, and
# tests/detect/test_compiled.py fails until the core builds again.
core: $(CORE)
$(CORE): $(STAMP) $(CORE_SOURCES)
	SYNTHWATCH_COMPILED_CORE=0 $(BIN)/python -c 'from synthwatch.stream_apps.detect import compiled; print("compiled detection core:", compiled.build())' \
	  || { rm -rf build/core; echo "WARNING: the compiled detection core did not build (above); pure Python runs"; }

# After a deliberate upgrade: a fresh venv with the newest versions pyproject.toml allows, frozen into
# constraints.txt. Run `make test` before committing it.
constraints:
	rm -rf build/constraints-venv && $(PYTHON) -m venv build/constraints-venv
	build/constraints-venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	{ sed -n '1,2p' constraints.txt; build/constraints-venv/bin/pip freeze --exclude-editable | grep -vi '^synthwatch'; } > constraints.new
	mv constraints.new constraints.txt && rm -rf build/constraints-venv

demo: install
	$(BIN)/synthwatch demo
	SYNTHWATCH_DATA_DIR=$${SYNTHWATCH_DATA_DIR:-.synthwatch}/demo $(BIN)/synthwatch report --out report.html --since 35d
	@echo "Report for people without Grafana: report.html (open it in a browser)."


test: install lint
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest $(XDIST) -m "not slow and not integration" $(PYTEST_ARGS)

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
