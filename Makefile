# Forwards to CMake, the one build. Targets:
#   make          build the library, the qkv command and the tests (build/)
#   make run      build and run `qkv bench`
#   make test     build and run the test suite: the C runner and the Python
#                 package's pytest (last line: N passed, N failed)
#   make san      the test suite under AddressSanitizer + UndefinedBehaviorSanitizer
#   make bench    side-by-side benchmark against torch and ggml (bench/.venv,
#                 or BENCH_VENV=DIR); rewrites its section of docs/PERFORMANCE.md
#   make install  cmake --install build (PREFIX=/usr/local)
BUILD ?= build
SAN_BUILD ?= build-san
PREFIX ?= /usr/local
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
BENCH_VENV ?= bench/.venv
PYENV ?= .venv
BENCH_ARGS ?=

.PHONY: all run test san bench install clean deps

all: $(BUILD)/Makefile
	cmake --build $(BUILD) -j $(JOBS)

$(BUILD)/Makefile: CMakeLists.txt
	@command -v cmake >/dev/null || bash scripts/setup.sh
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX=$(PREFIX)

run: all
	$(BUILD)/qkv bench

test: all
	bash scripts/check_install.sh $(BUILD)
	bash scripts/test.sh $(BUILD) $(PYENV)

san:
	@command -v cmake >/dev/null || bash scripts/setup.sh
	cmake -S . -B $(SAN_BUILD) -DCMAKE_BUILD_TYPE=Debug -DQKV_SANITIZE=ON
	cmake --build $(SAN_BUILD) -j $(JOBS)
	QKV_TEST_QUICK=1 ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 $(SAN_BUILD)/qkv_tests

bench: all
	BENCH_VENV=$(BENCH_VENV) bash bench/setup.sh
	$(BENCH_VENV)/bin/python bench/bench.py --lib $(BUILD)/libqkv.so --write-doc $(BENCH_ARGS)

install: all
	cmake --install $(BUILD)

clean:
	rm -rf $(BUILD) $(SAN_BUILD)
