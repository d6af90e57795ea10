# `make demo` sets everything up (.venv from requirements-dev.txt, the package installed editable) and runs the
# offline demo. `make test` runs the test suite; .ci/run runs exactly that.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench bench-trunks bench-precision bench-decode bench-weights sweep pretrain clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

demo: setup
	$(PY) cli.py demo

test: setup
	$(PY) -m pytest

# The measurements behind docs/performance.md (benchmarks/, outside the package). `make bench` is the whole
# developers' bench (half an hour to an hour on 2 cores); the parts below run alone.
bench: setup
	$(PY) benchmarks/bench.py

# --precision auto end to end against fp32, and the recall change of int8-fbgemm, int8-ort and bf16 on ShapesCLIP.
bench-precision: setup
	$(PY) benchmarks/bench.py --precision

# The fp32 trunks alone: against the GEMM ceiling and open_clip's forwards, and the projected fp32 Flickr30k extract.
bench-trunks: setup
	$(PY) benchmarks/bench.py --trunks

# Decoding JPEGs on the device (jpeg.py) against PIL: min cosine on ViT-B/32, recall on ShapesCLIP.
bench-decode: setup
	$(PY) benchmarks/bench.py --decode

# int8-ort's weight types beside int8-fbgemm, against fp32 (a few minutes).
bench-weights: setup
	$(PY) benchmarks/bench.py --weights

# docs/probe-defaults.md's tables: ShapesCLIP on the demo's shifted world, 3 seeds a setting.
sweep: setup
	$(PY) benchmarks/sweep.py

# Rebuild finetune_clip/pretrained/ShapesCLIP.pt from scratch (seeded; about 10 minutes on 2 cores). It is committed.
pretrain: setup
	$(PY) benchmarks/pretrain.py

clean:
	rm -rf cache/demo_* data/demo artifacts/*.json artifacts/*.png checkpoints/*.pt
