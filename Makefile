# Two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
# torch is installed first and pinned: on these CPU machines the pin takes the local CPU wheel,
# while an unpinned torch would pull a multi-GB CUDA build.
# The console scripts (not `python -m`) keep this checkout off sys.path: its kernels/ and nodes/
# folders would otherwise shadow top-level packages of the same names that diffusers looks for.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/ditq demo

test: $(VENV)/.installed
	$(VENV)/bin/pytest -q

.PHONY: install demo test
