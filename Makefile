# moeforge: every target installs what it needs first (scripts/install-deps.sh is idempotent).
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all deps build test run bench format clean

all: build

deps:
	$(SUDO) bash scripts/install-deps.sh

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)

build: deps $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

# The main job: train the embedded default (configs/default.toml) on the Brown corpus, evaluate it, print a
# sample, and write runs/default/ (metrics.jsonl, checkpoints/, report.md with plots).
run: build
	./$(BUILD)/moeforge train --out runs/default

bench: build
	mkdir -p runs
	./$(BUILD)/moeforge bench --json runs/bench.json
	./$(BUILD)/moeforge bench --train --reps 20 --json runs/bench-train.json

format:
	find include src apps bench tests kernels -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null | xargs clang-format -i

clean:
	rm -rf $(BUILD)
