# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt pytest==9.2.0
	touch $@

# The demo: self-supervised vs semi-supervised (pitch-class labels on a quarter of the
# train set, kept out of pitch shift) on the built-in synthetic set, then probes.
DEMO_MODEL := --encoder melcnn --width 0.25 --clip-seconds 1 --sample-rate 16000
DEMO_TRAIN := $(DEMO_MODEL) --batch-size 32 --steps 150 --lr 1e-3 --val-every 50 --save-every 50 --workers 2
demo: $(VENV)/installed
	$(PY) train.py $(DEMO_TRAIN) --out runs/demo-selfsup --labeled-per-batch 0
	$(PY) train.py $(DEMO_TRAIN) --out runs/demo-semisup --label-column pitch_class --label-kind pitch_class \
		--labeled-fraction 0.25 --augment-labeled gain,polarity,noise,filter,delay
	$(PY) probe.py $(DEMO_MODEL) --checkpoint runs/demo-selfsup --checkpoint runs/demo-semisup --checkpoint random \
		--label-column pitch_class --label-column timbre --head linear --out runs/demo-results.json

test: $(VENV)/installed
	$(PY) -m pytest -q tests

bench: $(VENV)/installed
	$(PY) bench.py all

clean:
	rm -rf runs .cache
