# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv on first use, then run the main job on the built-in dataset
#   make test   - create .venv on first use, then run the fast test suite (make test-all: all)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-detr eval-demo test test-all bench gpu-check lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

# The demo: DINO's decoder on Deformable DETR over a small PVT on the built-in shapes set, CPU
# only, trained end to end from scratch (configs/demo.txt). The recipes are argparse @files in
# configs/ (the benchmarks read the same files).
DEMO_DIR := outputs/demo

demo: $(STAMP)
	$(PY) main.py @configs/demo.txt --output_dir $(DEMO_DIR) \
		$(if $(wildcard $(DEMO_DIR)/checkpoint.pth),--resume $(DEMO_DIR)/checkpoint.pth)

# DETR on the same data: its backbone is first pretrained on the same images by labelling each
# stage-3 patch with the class of the box it lies in (the stand-in for ImageNet pretraining),
# then DETR trains on the frozen stage-3 features (configs/demo_detr.txt).
DETR_DEMO_DIR := outputs/demo_detr

$(DETR_DEMO_DIR)/backbone.pth: $(STAMP)
	$(PY) pretrain_backbone.py @configs/demo_pretrain.txt --output $@

demo-detr: $(DETR_DEMO_DIR)/backbone.pth
	$(PY) main.py @configs/demo_detr.txt --pretrained_backbone $< --output_dir $(DETR_DEMO_DIR) \
		$(if $(wildcard $(DETR_DEMO_DIR)/checkpoint.pth),--resume $(DETR_DEMO_DIR)/checkpoint.pth)

# Evaluate the demo's checkpoint on the built-in validation set (the model is rebuilt from the
# checkpoint; only the data flags are given); AMP=bf16 for bf16 autocast.
AMP ?= none
eval-demo: $(STAMP)
	$(PY) main.py @configs/demo_data.txt --eval --resume $(DEMO_DIR)/checkpoint.pth \
		--output_dir "" --amp $(AMP)

# One thread per process: the tests start several processes (torch.distributed, submitit) and
# their models are small; two threads each on a 2-core machine oversubscribe it badly.
# make test: the fast suite, unit and property tests, to run after every change (a few minutes);
# make test-all: every test, the end-to-end runs marked slow too (what CI runs).
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -m "not slow"

test-all: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest tests

# Speed and memory of PVT-Small + DETR on this machine, one Markdown table (benchmarks/speed.py).
bench: $(STAMP)
	$(PY) benchmarks/speed.py

# The CUDA and NCCL paths on a machine with a GPU, in a few minutes (benchmarks/gpu_check.py);
# without CUDA it says so and exits 0.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) outputs
