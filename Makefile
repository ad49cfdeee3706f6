# largebatch: top-level entry points. `make test` alone installs, configures, builds and tests.
BUILD_DIR  ?= build
BUILD_TYPE ?= Release
JOBS       ?= 2
CMAKE_ARGS ?=
SAN_DIR    ?= build-san
FUZZ_SECONDS ?= 60

.PHONY: all setup configure build test install clean demo bench sanitize fuzz python FORCE

all: build

setup:
	bash scripts/setup.sh

# Configured again whenever a CMake file changes or the configuration asked for (BUILD_TYPE, CMAKE_ARGS) is
# not the one the build directory was configured with.
CMAKE_INPUTS := CMakeLists.txt $(wildcard tests/CMakeLists.txt cmake/*)
CONFIGURATION := -G Ninja -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) $(CMAKE_ARGS)

$(BUILD_DIR)/.configuration: FORCE
	@mkdir -p $(BUILD_DIR)
	@echo '$(CONFIGURATION)' | cmp -s - $@ || echo '$(CONFIGURATION)' > $@

$(BUILD_DIR)/build.ninja: $(CMAKE_INPUTS) $(BUILD_DIR)/.configuration
	cmake -S . -B $(BUILD_DIR) $(CONFIGURATION)
	@touch $@

FORCE:

configure: $(BUILD_DIR)/build.ninja

build: setup configure
	cmake --build $(BUILD_DIR) -j $(JOBS)

test: build
	bash scripts/run_tests.sh $(BUILD_DIR) -j $(JOBS)

# The Python package into $(BUILD_DIR)/python: PYTHONPATH=$(BUILD_DIR)/python python3 -c "import largebatch"
# (docs/PYTHON.md). Installs its Debian packages first.
python:
	bash scripts/setup.sh --python
	@mkdir -p $(BUILD_DIR) && echo '$(CONFIGURATION)' > $(BUILD_DIR)/.configuration
	cmake -S . -B $(BUILD_DIR) $(CONFIGURATION)
	cmake --build $(BUILD_DIR) -j $(JOBS) --target python

# The test suite under AddressSanitizer + UndefinedBehaviorSanitizer (clang, its own build directory), then
# every fuzz target for FUZZ_SECONDS (docs/RELIABILITY.md); the sanitizers' options are set by CMakeLists.txt.
# The install test and the check of the documented commands are left out: neither exercises memory safety.
sanitize:
	bash scripts/setup.sh --sanitize
	cmake -S . -B $(SAN_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=clang++ \
	  -DLARGEBATCH_FUZZ=ON -DLARGEBATCH_FUZZ_SECONDS=$(FUZZ_SECONDS) -DLARGEBATCH_BUILD_EXAMPLES=OFF \
	  -DLARGEBATCH_BUILD_BENCHMARKS=OFF $(CMAKE_ARGS)
	cmake --build $(SAN_DIR) -j $(JOBS)
	bash scripts/run_tests.sh $(SAN_DIR) -j $(JOBS) -LE fuzz -E '^(package|docs)\.'
	bash scripts/run_tests.sh $(SAN_DIR) -j $(JOBS) -L fuzz

# Only the bounded fuzzing (after make sanitize has built $(SAN_DIR)); FUZZ_SECONDS per target.
fuzz:
	cmake -S . -B $(SAN_DIR) -DLARGEBATCH_FUZZ_SECONDS=$(FUZZ_SECONDS)
	cmake --build $(SAN_DIR) -j $(JOBS)
	bash scripts/run_tests.sh $(SAN_DIR) -j $(JOBS) -L fuzz

# Speed against the Python reference and the bandwidth bound (docs/PERFORMANCE.md); needs python3-torch.
bench: build
	bash scripts/setup.sh --bench
	$(BUILD_DIR)/largebatch bench step --repeats 30 --instruction-sets all --block-bytes 128K,512K,2M,8M
	$(BUILD_DIR)/bench_step --benchmark_counters_tabular=true --benchmark_min_time=0.5
	$(BUILD_DIR)/largebatch bench train --model resnet18 --batch-sizes 64,128,256,512 --steps 7 --out $(BUILD_DIR)/bench
	$(BUILD_DIR)/bench_kernels --benchmark_counters_tabular=true --benchmark_min_time=0.5
	$(BUILD_DIR)/largebatch bench train --model resnet18 --batch-sizes 64,128,256,512 --steps 7 --cpu-kernels false
	$(BUILD_DIR)/largebatch bench train --model cnn --batch-sizes 256,1024,4096
	$(BUILD_DIR)/largebatch bench train --model cnn --batch-sizes 256,1024,4096 --cpu-kernels false
	$(BUILD_DIR)/largebatch bench train --model cnn --batch-sizes 256,1024,4096 --channels-last
	$(BUILD_DIR)/largebatch bench train --model mlp --batch-sizes 1024,4096,16384 --steps 10
	$(BUILD_DIR)/largebatch bench train --model resnet20 --batch-sizes 256,512,1024 --steps 5
	$(BUILD_DIR)/largebatch bench pretrain --model resnet20 --batch-sizes 256,512 --steps 3
	$(BUILD_DIR)/largebatch bench pipeline --batches 6
	$(BUILD_DIR)/largebatch bench profile --model cnn --batch-size 1024
	$(BUILD_DIR)/largebatch bench profile --model resnet20 --batch-size 512
	$(BUILD_DIR)/largebatch bench profile --model resnet20 --task barlow-twins --batch-size 512

demo: build
	bash scripts/demo.sh $(BUILD_DIR)/largebatch

install: build
	cmake --install $(BUILD_DIR) $(if $(PREFIX),--prefix $(PREFIX),)

clean:
	rm -rf $(BUILD_DIR)
