# The two commands: `make serve` and `make test` do all set-up on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TINY    := .models/tiny
MODEL   ?= $(TINY)
PORT    ?= 9000
STUBS   := proto/polyglot/v1/lm_pb2.py proto/polyglot/v1/lm_pb2_grpc.py

.PHONY: serve test test-gpu bench bench-quick proto tiny venv clean

serve: $(STUBS) $(if $(filter $(TINY),$(MODEL)),$(TINY)/BUILD.json)
	$(BIN)/python -m service.serve.launch --model $(MODEL) --grpc-port $(PORT)

test: $(STUBS) $(TINY)/BUILD.json
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# The GPU suite (tests/gpu, marker `gpu`): on a GPU host, never in CI. That host's Python must already have the
# packages (the GPU machine: ../shared/gpu/bundle.sh's site on PYTHONPATH, README "GPU test suite"); the suite
# builds the 5.8B-shape random checkpoint in /tmp unless POLYGLOT_GPU_MODEL names one.
GPU_PY  ?= python3
test-gpu:
	$(GPU_PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto proto/polyglot/v1/lm.proto
	PYTHONPATH=$(CURDIR):$(CURDIR)/proto:$$PYTHONPATH $(GPU_PY) -m pytest -q -p no:cacheprovider -m gpu -rs tests/gpu

bench: $(STUBS)
	$(BIN)/python -m service.bench

bench-quick: $(STUBS) $(TINY)/BUILD.json
	$(BIN)/python -m service.bench --quick

venv: $(STAMP)
proto: $(STUBS)
tiny: $(TINY)/BUILD.json

# torch first, pinned: its CPU wheel lies on this kind of machine's disk; unpinned, pip pulls a
# multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

$(STUBS) &: proto/polyglot/v1/lm.proto $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto proto/polyglot/v1/lm.proto

$(TINY)/BUILD.json: service/engine/tiny.py service/engine/data/ko_corpus.txt $(STAMP)
	$(BIN)/python -m service.engine.tiny --out $(TINY) --force

clean:
	rm -rf $(VENV) .models $(STUBS) proto/polyglot/v1/lm_pb2.pyi
