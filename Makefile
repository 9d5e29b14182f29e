# The two commands of the README:
#   make demo   install tractoscale into .venv and run it on the built-in demo dataset
#   make test   install the test dependencies into .venv and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo
# Numba compiles kernels once and reuses them between processes and runs
export NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache
# PyTorch for the `learn` extra that `test` includes: the CPU build (about 750 MB installed). A bare
# torch requirement resolves to a CUDA build of several GB on Linux; set TORCH to choose another.
TORCH  ?= torch==2.13.0

.PHONY: demo test venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

venv: $(BIN)/python

# 8 subjects (4 controls, 4 patients): with 2 vs 2 there are only 6 relabelings, so no
# permutation test could reach p < 0.05; 4 vs 4 gives 70.
demo: $(BIN)/python
	$(BIN)/python -m pip install --quiet .
	$(BIN)/tractoscale demo-data $(DEMO)/bids --subjects 8 --size small
	$(BIN)/tractoscale $(DEMO)/bids $(DEMO)/derivatives participant --nthreads 2 --seeds-per-voxel 4
	$(BIN)/tractoscale $(DEMO)/bids $(DEMO)/derivatives group --stats-column group --n-permutations 500
	@echo
	@echo "Demo finished."
	@echo "  input BIDS dataset : $(DEMO)/bids (ground truth in $(DEMO)/bids/sourcedata/groundtruth)"
	@echo "  participant outputs: $(DEMO)/derivatives/sub-*/  (QC figures in sub-*/figures)"
	@echo "  group outputs      : $(DEMO)/derivatives/group/"

test: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]" "$(TORCH)"
	NUMBA_ENABLE_CUDASIM=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(DEMO) .numba_cache .pytest_cache build *.egg-info
