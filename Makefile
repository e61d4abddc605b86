# Forwards to CMake, the one build. Targets:
#   make          build the library, the qkv command and the tests (build/)
#   make run      build and run `qkv bench`
#   make test     build and run the test suite: the C runner and the Python
#                 package's pytest (last line: N passed, N failed)
#   make san      the test suite under AddressSanitizer + UndefinedBehaviorSanitizer,
#                 then `make fuzz`
#   make fuzz     the libFuzzer targets of fuzz/ (clang, ASan), FUZZ_SECONDS each
#   make bench-models  MiniLM embeddings beside sentence-transformers (bench/models.py)
#   make bench-generate  stories260K tokens/s at batch 1 and 32 beside a NumPy Llama
#                 (bench/generate.py); rewrites its section of docs/PERFORMANCE.md
#   make bench    side-by-side benchmark against torch and ggml (bench/.venv,
#                 or BENCH_VENV=DIR); rewrites its section of docs/PERFORMANCE.md
#   make install  cmake --install build (PREFIX=/usr/local)
BUILD ?= build
SAN_BUILD ?= build-san
FUZZ_BUILD ?= build-fuzz
FUZZ_SECONDS ?= 30
FUZZ_TARGETS = safetensors config tokenizer llama2c llama_tok
PREFIX ?= /usr/local
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
BENCH_VENV ?= bench/.venv
PYENV ?= .venv
BENCH_ARGS ?=

.PHONY: all run test san fuzz bench bench-models bench-generate install clean deps

all: $(BUILD)/Makefile
	cmake --build $(BUILD) -j $(JOBS)

# scripts/setup.sh installs only what is missing (build tools, the model
# runtime's libraries, the MiniLM files), so a fresh machine needs no step
# before `make test`
$(BUILD)/Makefile: CMakeLists.txt
	bash scripts/setup.sh
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX=$(PREFIX)

run: all
	$(BUILD)/qkv bench

test: all
	bash scripts/check_install.sh $(BUILD)
	bash scripts/test.sh $(BUILD) $(PYENV)

san:
	bash scripts/setup.sh
	cmake -S . -B $(SAN_BUILD) -DCMAKE_BUILD_TYPE=Debug -DQKV_SANITIZE=ON
	cmake --build $(SAN_BUILD) -j $(JOBS)
	QKV_TEST_QUICK=1 ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 $(SAN_BUILD)/qkv_tests
	$(MAKE) fuzz

# Each target runs FUZZ_SECONDS from a copy of its seed corpus (fuzz/corpus/),
# so what libFuzzer adds stays in the build folder.
fuzz:
	@command -v clang >/dev/null || bash scripts/setup.sh
	CC=clang cmake -S . -B $(FUZZ_BUILD) -DCMAKE_BUILD_TYPE=Debug -DQKV_FUZZ=ON \
	  -DQKV_BUILD_TESTS=OFF
	cmake --build $(FUZZ_BUILD) -j $(JOBS) $(addprefix --target fuzz_,$(FUZZ_TARGETS))
	@for t in $(FUZZ_TARGETS); do \
	  rm -rf $(FUZZ_BUILD)/corpus_$$t && cp -r fuzz/corpus/$$t $(FUZZ_BUILD)/corpus_$$t && \
	  echo "fuzz_$$t: $(FUZZ_SECONDS) s" && \
	  UBSAN_OPTIONS=halt_on_error=1 $(FUZZ_BUILD)/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) \
	    -max_len=4096 -print_final_stats=1 $(FUZZ_BUILD)/corpus_$$t \
	    > $(FUZZ_BUILD)/fuzz_$$t.log 2>&1; rc=$$?; \
	  grep -E "^stat::(number_of_executed_units|new_units_added)" $(FUZZ_BUILD)/fuzz_$$t.log; \
	  if [ $$rc -ne 0 ]; then tail -60 $(FUZZ_BUILD)/fuzz_$$t.log; exit 1; fi; \
	done

bench: all
	BENCH_VENV=$(BENCH_VENV) bash bench/setup.sh
	$(BENCH_VENV)/bin/python bench/bench.py --lib $(BUILD)/libqkv.so --write-doc $(BENCH_ARGS)

bench-models: all
	BENCH_VENV=$(BENCH_VENV) bash bench/setup.sh
	$(BENCH_VENV)/bin/python -c "import sentence_transformers" 2>/dev/null || \
	  $(BENCH_VENV)/bin/python -m pip install -q sentence-transformers
	bash scripts/setup_models.sh
	$(BENCH_VENV)/bin/python bench/models.py --lib $(BUILD)/libqkv.so --write-doc

# numpy from the test environment (scripts/pyenv.sh) is all it needs
bench-generate: all
	bash scripts/pyenv.sh $(PYENV) $(BUILD)
	$(PYENV)/bin/python bench/generate.py --qkv $(BUILD)/qkv --lib $(BUILD)/libqkv.so --write-doc

install: all
	cmake --install $(BUILD)

clean:
	rm -rf $(BUILD) $(SAN_BUILD) $(FUZZ_BUILD)
