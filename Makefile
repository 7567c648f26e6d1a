# SkipPipe: `make run` and `make test` install into .venv on first use (see README).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.install.stamp
TORCH   ?= torch==2.13.0
export OMP_NUM_THREADS ?= 1
export WANDB_SILENT ?= true

.PHONY: install run test test-fast lint bench bench-plan bench-plan-suite bench-runtime bench-network bench-quality bench-fault bench-verify bench-chaos bench-precision check-docs clean

install: $(STAMP)

# torch first (a CPU build here; a plain `torch` from the index would pull a multi-GB CUDA build),
# then the project with its dev extra. The stamp makes this idempotent.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,hf]"
	touch $(STAMP)

run: install
	$(BIN)/skippipe train configs/tiny.yaml run.overwrite=true

# the multi-raylet Ray cluster gets a pytest process of its own: after another module's local
# ray.init/ray.shutdown in the same process, connecting to a new cluster can hang
test: install
	$(BIN)/python -m pytest -q --ignore=tests/test_ray_multinode.py
	$(BIN)/python -m pytest -q tests/test_ray_multinode.py

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# every command block of README.md and examples/*/README.md, run as written (minutes: training,
# torchrun, a Ray cluster on the default ports); CI runs the quick ones through tests/test_docs.py
check-docs: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tests/check_docs.py --all

lint: install
	$(BIN)/ruff check skippipe tests bench launch

bench: bench-plan bench-plan-suite bench-runtime bench-network bench-fault bench-verify bench-quality bench-precision

bench-plan: install
	$(BIN)/python bench/plan_bench.py

bench-plan-suite: install
	$(BIN)/python bench/plan_suite.py

bench-runtime: install
	$(BIN)/python bench/runtime_bench.py

bench-network: install
	$(BIN)/python bench/network_bench.py

bench-fault: install
	$(BIN)/python bench/fault_bench.py

bench-verify: install
	$(BIN)/python bench/verify_bench.py

bench-quality: install
	$(BIN)/python bench/quality_study.py

bench-precision: install
	$(BIN)/python bench/precision_bench.py

# not part of `make bench` or CI (tests/test_chaos.py runs its short version)
bench-chaos: install
	$(BIN)/python bench/chaos.py

clean:
	rm -rf runs wandb .pytest_cache
