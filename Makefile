# Set-up is part of every target: a fresh clone needs nothing but `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: test demo demo-chat demo-chat-seeds bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,annotate]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check preftune tests bench
	./scripts/test-setup.sh
	$(PY) -m pytest

demo: $(STAMP)
	$(VENV)/bin/preftune demo --output_dir $(DEMO_DIR)

# SmolLM2-135M-Instruct (from PyPI) aligned by two rounds of iterative DPO; report in runs/demo-chat/report.html
demo-chat: $(STAMP)
	$(VENV)/bin/preftune demo --model smollm2 --output_dir runs/demo-chat

# The README's demo-chat table: seeds 0, 1 and 2, the figures over them, written into README.md from the JSON
demo-chat-seeds: $(STAMP)
	$(VENV)/bin/preftune demo --model smollm2 --seeds 0 1 2 --output_dir runs/demo-chat-seeds
	$(PY) scripts/demo_chat_table.py runs/demo-chat-seeds/demo_summary.json --readme README.md
	cp runs/demo-chat-seeds/demo_summary.json docs/demo_chat_summary.json

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) bench/dpo_throughput.py
	$(PY) bench/ppo_throughput.py
	$(PY) bench/grpo_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
