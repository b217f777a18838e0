# The commands of the README. Each creates .venv on first use (CPU torch when there is no GPU).
VENV ?= .venv
PYTEST_ARGS ?=
PY := $(VENV)/bin/python

.PHONY: demo test env gpu-check

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $@

demo: env
	bash scripts/demo.sh $(VENV)

test: env
	$(PY) -m pytest $(PYTEST_ARGS)

# The checks that need a CUDA GPU (tests, setup memory of a ~1B QLoRA run, resume, benchmarks): one table.
gpu-check: env
	bash scripts/gpu_check.sh $(VENV)
