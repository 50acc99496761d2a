# Two entry points that work on a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# The embedded default job: BreastMNIST from the data dir, 50% uniform noise injected
# into train so that detection can be measured, LiNC + a plain cross-entropy baseline.
# It runs the Prefect flow clean-labels in-process (a temporary local Prefect server) and
# stores the artifacts under ./artifacts/jobs/<job-id>/ (the embedded default store).
RUN_ARGS ?= --dataset medmnist://breastmnist --noise uniform:0.5 --epochs 30 \
            --warmup-epochs 10 --seed 0 --baseline

.PHONY: venv run test lint bench results proto serve clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[all,dev]"
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/noisescore clean $(RUN_ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy noisescore ml flows service

bench: $(STAMP)
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_service.py

# Regenerate the gRPC stubs in noisescore/v1 from proto/ (tests check they are current).
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. \
	    --grpc_python_out=. proto/noisescore/v1/noise_scoring.proto

# The gRPC service on 127.0.0.1:50051 (metrics on :9464), artifacts in ./artifacts.
serve: $(STAMP)
	$(BIN)/noisescore serve

results: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[all,dev,bench]"
	$(BIN)/python bench/paper_results.py --jobs 2

clean:
	rm -rf $(VENV) runs artifacts .pytest_cache .ruff_cache .mypy_cache
