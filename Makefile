# moeforge: every target installs what it needs first (scripts/install-deps.sh is idempotent).
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all deps build test run bench format clean fuzz test-sanitize python

all: build

deps:
	$(SUDO) bash scripts/install-deps.sh

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)

build: deps $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

# The Python package (python/, docs/python.md), built against Debian's torch into .venv/.
python: build
	bash scripts/build-python.sh $(BUILD) .venv

test: build python
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

# libFuzzer targets (clang 14, ASan + UBSan) for the loaders, each run FUZZ_SECONDS from fuzz/corpus/ and
# fuzz/regressions/; new inputs and findings go to $(FUZZ_BUILD)/ (docs/reliability.md).
FUZZ_BUILD ?= build-fuzz
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := safetensors checkpoint config tokenizer hf serve
fuzz: deps
	cmake -S . -B $(FUZZ_BUILD) -DMOEFORGE_FUZZ=ON -DMOEFORGE_CUDA=OFF -DMOEFORGE_TESTS=OFF \
	  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 -gline-tables-only" \
	  -DCMAKE_CXX_COMPILER=clang++-14 -DCMAKE_C_COMPILER=clang-14
	cmake --build $(FUZZ_BUILD) -j $(JOBS) --target $(addprefix fuzz_,$(FUZZ_TARGETS))
	bash scripts/fuzz.sh $(FUZZ_BUILD) $(FUZZ_SECONDS) $(FUZZ_TARGETS)

# The whole project and its tests under AddressSanitizer + UndefinedBehaviorSanitizer (clang 14), in a
# build folder of its own (docs/reliability.md).
SANITIZE_BUILD ?= build-sanitize
test-sanitize: deps
	cmake -S . -B $(SANITIZE_BUILD) -DMOEFORGE_SANITIZE=ON -DMOEFORGE_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -gline-tables-only" \
	  -DCMAKE_CXX_COMPILER=clang++-14 -DCMAKE_C_COMPILER=clang-14
	cmake --build $(SANITIZE_BUILD) -j $(JOBS)
	cd $(SANITIZE_BUILD) && ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ctest --output-on-failure -j $(JOBS)

# The main job: train the embedded default (configs/default.toml) on the Brown corpus, evaluate it, print a
# sample, and write runs/default/ (metrics.jsonl, checkpoints/, report.md with plots).
run: build
	./$(BUILD)/moeforge train --out runs/default --overwrite

bench: build
	mkdir -p runs
	./$(BUILD)/moeforge bench --json runs/bench.json
	./$(BUILD)/moeforge bench --train --reps 20 --json runs/bench-train.json

format:
	find include src apps bench tests kernels -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null | xargs clang-format -i

clean:
	rm -rf $(BUILD)
