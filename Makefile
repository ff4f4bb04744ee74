# `make lab`: set up .venv on first use, then open JupyterLab on the notebooks.
# `make test`: set up .venv on first use, then run the unit tests and every notebook.
# `make class`: student notebooks made with nbgrader into class/; `make grade SUBMISSIONS=folder`
# grades a folder of them (TEACHING.md).
# Both reinstall nothing on a second run: .venv/.installed records the last install.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings
LAB_OVERRIDES := {"@jupyterlab/apputils-extension:notification": \
	{"fetchNews": "false", "checkForUpdates": false}}

.PHONY: lab test bench class grade clean-venv

$(STAMP): requirements.txt pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	# d2l is the reference the tests compare against. --no-deps: its exact pins
	# would downgrade numpy and break current Python.
	$(BIN)/python -m pip install --quiet --no-deps d2l==1.0.3
	$(BIN)/python -m pip install --quiet --no-deps -e .
	# JupyterLab's own settings overrides, inside .venv (never the user's home): no prompt about
	# Jupyter news, and no check for updates, which would need the internet.
	mkdir -p $(LAB_SETTINGS)
	echo '$(LAB_OVERRIDES)' > $(LAB_SETTINGS)/overrides.json
	touch $(STAMP)

# Jupyter refuses to start as root (containers, CI boxes) unless told it may.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/ $(ROOT_FLAG)

# TINYSSD_FAST=1 is the one fast-mode switch: long notebooks shrink their runs.
test: $(STAMP)
	TINYSSD_FAST=1 $(BIN)/python -m pytest -q --nbval --nbval-current-env tests notebooks

class: $(STAMP)
	$(BIN)/python classroom.py build

grade: $(STAMP)
	@test -n "$(SUBMISSIONS)" || { echo "usage: make grade SUBMISSIONS=folder"; exit 2; }
	$(BIN)/python classroom.py grade "$(SUBMISSIONS)"

bench: $(STAMP)
	$(BIN)/python tests/benchmark.py

clean-venv:
	rm -rf $(VENV)
