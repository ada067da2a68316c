# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

# Re-installs only when pyproject.toml changes, so a second `make install` takes seconds.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

DATA := runs/data/default

# Until the sweep lands, the demo prepares the embedded default data (the installed
# Python sources, no download), partitions it IID and non-IID, and prints the summaries.
demo: install
	$(VENV)/bin/fedjax-code data prepare --out $(DATA)
	$(VENV)/bin/fedjax-code data partition --data $(DATA) --scheme iid --clients 16 --out $(DATA)/partitions/iid.json
	$(VENV)/bin/fedjax-code data partition --data $(DATA) --scheme dirichlet --alpha 0.5 --clients 16 --out $(DATA)/partitions/dirichlet-0.5.json
	$(VENV)/bin/fedjax-code data shards --data $(DATA) --partition $(DATA)/partitions/dirichlet-0.5.json --out $(DATA)/shards/dirichlet-0.5

test: install
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
