# The commands of the README:
#   make demo   install tractoscale into .venv and run it on the built-in demo dataset
#   make test   install the test dependencies into .venv and run the whole test suite
#   make image  build the container image with docker or podman (see the Dockerfile's build arguments)
#   make sif    the image as an Apptainer SIF
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo
# Every package pinned: the versions the image ships are the versions the tests run on
PINS   := -c docker/constraints.txt
# Numba compiles kernels once and reuses them between processes and runs
export NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache
# PyTorch for the `learn` extra that `test` includes: the CPU build (about 750 MB installed). A bare
# torch requirement resolves to a CUDA build of several GB on Linux; set TORCH to choose another.
TORCH  ?= torch==2.13.0

.PHONY: demo test venv clean image sif

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

venv: $(BIN)/python

# 8 subjects (4 controls, 4 patients): with 2 vs 2 there are only 6 relabelings, so no
# permutation test could reach p < 0.05; 4 vs 4 gives 70.
# The reports' 3D viewer (niivue) comes from the npm registry; without npm the reports are written
# without it (and say so).
demo: $(BIN)/python
	$(BIN)/python -m pip install --quiet $(PINS) .
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
	$(BIN)/python -m pip install --quiet $(PINS) -e ".[test]" "$(TORCH)"
	$(BIN)/tractoscale install-viewer || echo "warning: niivue not installed (needs npm): report tests check reports without the 3D view"
	NUMBA_ENABLE_CUDASIM=1 $(BIN)/python -m pytest -q

# make image [ENGINE=docker|podman] [BASE_IMAGE=...] [TEMPLATEFLOW=skip] [BUILD_OPTS=...]
VERSION      := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE        ?= tractoscale/tractoscale:$(VERSION)
ENGINE       ?= $(shell if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then echo docker; \
                        elif command -v podman >/dev/null 2>&1; then echo podman; fi)
TEMPLATEFLOW ?= fetch
BASE_IMAGE   ?=
BUILD_OPTS   ?=
image:
	@test -n "$(ENGINE)" || { echo "make image: needs docker (with its daemon running) or podman" >&2; exit 1; }
	DOCKER_BUILDKIT=1 $(ENGINE) build --build-arg VERSION=$(VERSION) \
	    --build-arg VCS_REF=$$(git rev-parse --short HEAD 2>/dev/null || echo unknown) \
	    --build-arg TEMPLATEFLOW=$(TEMPLATEFLOW) $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) \
	    $(BUILD_OPTS) -t $(IMAGE) .
	$(ENGINE) image ls $(IMAGE)

# make sif: the image as an Apptainer SIF, from the engine's copy (needs apptainer)
SIF ?= tractoscale_$(VERSION).sif
sif:
	@test -n "$(ENGINE)" || { echo "make sif: needs docker (with its daemon running) or podman" >&2; exit 1; }
	rm -f $(SIF).tar
	$(ENGINE) save $(if $(filter podman,$(ENGINE)),--format docker-archive) -o $(SIF).tar $(IMAGE)
	apptainer build --force $(SIF) docker-archive://$(CURDIR)/$(SIF).tar
	rm -f $(SIF).tar
	ls -l $(SIF)

clean:
	rm -rf $(DEMO) .numba_cache .pytest_cache build *.egg-info
