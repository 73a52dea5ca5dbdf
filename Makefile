# quant-companion: the two commands are `make reproduce` (main job) and `make test` (tests).
# Both create .venv when missing and install into it only when pyproject.toml changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell $(PYTHON) -c "import hashlib,pathlib;print(hashlib.sha256(pathlib.Path('pyproject.toml').read_bytes()).hexdigest()[:16])")
PRESET ?= default
JOBS   ?= 2
ARGS   ?=

.PHONY: install reproduce test lint lab figures bench

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing paperlib and its pinned dependencies into $(VENV) (once per pyproject.toml)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (quant-companion)" >/dev/null
	@rm -f $(VENV)/.installed-* && touch $@

reproduce: $(STAMP)
	$(PY) -m paperlib reproduce --preset $(PRESET) --jobs $(JOBS) $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist worksteal $(ARGS)

figures: $(STAMP)
	$(PY) -m paperlib figures

lab: $(STAMP)
	$(PY) -m paperlib lab

bench: $(STAMP)
	$(PY) -m benchmarks.run
