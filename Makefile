# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench gpu-check gpu-check-cpu wheels clean

$(VENV)/installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt pytest==9.2.0
	touch $@

# The demo: self-supervised vs semi-supervised (pitch-class labels on a quarter of the
# train set, kept out of pitch shift) on the built-in synthetic set, with the k-NN monitor
# on pitch class and timbre, then probes, whose table, results and figures (confusion
# matrices, PNG) land in runs/, and a last line that checks the README's claims on this run
# (reports.py check). SEED (default 0) seeds both trainings and the probe; a seed other
# than 0 gets its own folders (runs/demo-seed3-selfsup, …), so seeds never resume each other.
# STEPS (default 150) shortens both trainings for a quick run end to end (CI runs STEPS=10);
# the README's claims are for 150 steps, so a shorter demo gets its own folders and no check.
SEED ?= 0
STEPS ?= 150
DEMO := runs/demo$(if $(filter-out 0,$(SEED)),-seed$(SEED))$(if $(filter-out 150,$(STEPS)),-steps$(STEPS))
DEMO_MODEL := --encoder melcnn --width 0.25 --clip-seconds 1 --sample-rate 16000
DEMO_MONITOR := --monitor-csv .cache/synthetic/manifest.csv --monitor-column pitch_class --monitor-column timbre \
	--monitor-every 50 --monitor-clips 2
DEMO_TRAIN := $(DEMO_MODEL) --batch-size 32 --steps $(STEPS) --lr 1e-3 --val-every 50 --save-every 50 --workers 2 \
	$(DEMO_MONITOR) --seed $(SEED)
demo: $(VENV)/installed
	$(PY) train.py $(DEMO_TRAIN) --out $(DEMO)-selfsup --labeled-per-batch 0
	$(PY) train.py $(DEMO_TRAIN) --out $(DEMO)-semisup --label-column pitch_class --label-kind pitch_class \
		--labeled-fraction 0.25 --augment-labeled gain,polarity,noise,filter,delay
	$(PY) probe.py $(DEMO_MODEL) --checkpoint $(DEMO)-selfsup --checkpoint $(DEMO)-semisup --checkpoint random \
		--label-column pitch_class --label-column timbre --head linear --retrieval --seed $(SEED) \
		--out $(DEMO)-results.json --plot
	$(if $(filter 150,$(STEPS)),$(PY) reports.py check $(DEMO)-results.json,\
		@echo "$(STEPS) steps: the README's claims are for the demo's 150 steps; not checked")

test: $(VENV)/installed
	$(PY) -m pytest -q -rs --durations=10 tests

bench: $(VENV)/installed
	$(PY) bench.py all --report docs/bench-results.md

# The GPU check runs on a machine that reaches no package index, with its own python3 and
# torch: what it lacks (soundfile, with cffi and pycparser) comes from wheels that
# `make wheels` downloads beforehand into .cache/wheels (carry that folder along).
GPU_PYTHON ?= python3
GPU_SITE := .cache/gpu-site
WHEELS := .cache/wheels
gpu-check:
	$(GPU_PYTHON) -c "import soundfile" 2>/dev/null || $(GPU_PYTHON) -m pip install --quiet --no-index --no-deps \
		--find-links $(WHEELS) --target $(GPU_SITE) soundfile cffi pycparser
	mkdir -p runs
	PYTHONPATH=$(GPU_SITE) $(GPU_PYTHON) bench.py gpu --report runs/gpu-check.md

# The same check on this machine's CPU at a tiny size, so that it cannot rot (CI runs it).
gpu-check-cpu: $(VENV)/installed
	$(PY) bench.py gpu --tiny --threads 2

wheels:
	for version in 3.10 3.11 3.12 3.13; do \
		$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
			--platform manylinux2014_x86_64 --python-version $$version -d $(WHEELS) \
			soundfile==0.14.0 cffi==2.1.1 pycparser==2.23; \
	done

clean:
	rm -rf runs .cache
