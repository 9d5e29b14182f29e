# The two commands of the README:
#   make demo   install tractoscale into .venv and run it on the built-in demo dataset
#   make test   install the test dependencies into .venv and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo
# Numba compiles kernels once and reuses them between processes and runs
export NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache

.PHONY: demo test venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

venv: $(BIN)/python

# 8 subjects (4 controls, 4 patients): with 2 vs 2 there are only 6 relabelings, so no
# permutation test could reach p < 0.05; 4 vs 4 gives 70.
# The reports' 3D viewer (niivue) comes from the npm registry; without npm the reports are written
# without it (and say so).
demo: $(BIN)/python
	$(BIN)/python -m pip install --quiet .
	$(BIN)/tractoscale install-viewer || echo "warning: no 3D viewer in the reports (needs npm)"
	$(BIN)/tractoscale demo-data $(DEMO)/bids --subjects 8 --size small
	$(BIN)/tractoscale $(DEMO)/bids $(DEMO)/derivatives participant --nthreads 2 --seeds-per-voxel 4
	$(BIN)/tractoscale $(DEMO)/bids $(DEMO)/derivatives group --stats-column group --n-permutations 500
	@echo
	@echo "Demo finished."
	@echo "  input BIDS dataset : $(DEMO)/bids (ground truth in $(DEMO)/bids/sourcedata/groundtruth)"
	@echo "  participant outputs: $(DEMO)/derivatives/sub-*/"
	@echo "  participant reports: $(DEMO)/derivatives/sub-*.html"
	@echo "  group outputs      : $(DEMO)/derivatives/group/  (report: $(DEMO)/derivatives/group/report.html)"

test: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/tractoscale install-viewer || echo "warning: niivue not installed (needs npm): report tests check reports without the 3D view"
	NUMBA_ENABLE_CUDASIM=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(DEMO) .numba_cache .pytest_cache build *.egg-info
