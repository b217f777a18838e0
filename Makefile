# The two commands of the README. Both create .venv on first use (CPU torch when there is no GPU).
VENV ?= .venv
PYTEST_ARGS ?=
PY := $(VENV)/bin/python

.PHONY: demo test env

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $@

demo: env
	bash scripts/demo.sh $(VENV)

test: env
	$(PY) -m pytest $(PYTEST_ARGS)
