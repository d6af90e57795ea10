# `make demo` sets everything up (.venv from requirements-dev.txt) and runs the offline demo.
# `make test` runs the test suite; .ci/run runs exactly that.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench bench-trunks bench-precision bench-decode sweep pretrain clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

demo: setup
	$(PY) cli.py demo

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) bench.py

# --precision auto end to end against fp32 (first time, and after `cli.py bench --compiled`), and the recall change
# of int8-fbgemm, int8-ort and bf16 on ShapesCLIP, 10,000 images and 15 more galleries of 1,000, 30 probe seeds a
# cache (about 50 minutes on 2 AVX2 cores before bf16 and the galleries joined; their recall rows took 24 minutes on
# an AMX Xeon).
bench-precision: setup
	$(PY) bench.py --precision

# The fp32 trunks alone: against the GEMM ceiling, open_clip's encode_text at 77 tokens and open_clip's forwards
# (the last block at every position), and the projected fp32 Flickr30k extract (a few minutes).
bench-trunks: setup
	$(PY) bench.py --trunks
# Decoding JPEGs on the device (jpeg.py) against PIL: min cosine on ViT-B/32, recall on ShapesCLIP (10,000 images and
# 15 more galleries; 11 minutes on an AMX Xeon).
bench-decode: setup
	$(PY) bench.py --decode

# The README's probe tables: the small pretrained CLIP on the demo's shifted world, 3 seeds a setting.
sweep: setup
	$(PY) tools/sweep_pretrained.py

# Rebuild pretrained/ShapesCLIP.pt from scratch (seeded; about 10 minutes on 2 cores). It is committed.
pretrain: setup
	$(PY) pretrain.py

clean:
	rm -rf cache/demo_* data/demo artifacts/*.json checkpoints/*.pt
