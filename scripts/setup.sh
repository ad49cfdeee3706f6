#!/usr/bin/env bash
# Installs every Debian package largebatch needs, skipping what is already present.
# Idempotent: a second run installs nothing and does not touch the network.
#   scripts/setup.sh          what building and testing need
#   scripts/setup.sh --bench  also Debian's python3-torch / python3-torchvision, the Python reference that
#                             `largebatch bench step|train` measures against (never needed by the product)
#   scripts/setup.sh --python the Python package's needs: python3-torch, python3-dev, pybind11-dev, python3-pytest
#   scripts/setup.sh --sanitize  also clang with its sanitizer and libFuzzer runtimes (make sanitize)
set -euo pipefail

PACKAGES=(
  cmake ninja-build g++ make pkg-config
  libtorch-dev            # LibTorch 1.13 (CPU)
  libgloo-dev             # c10d ProcessGroupGloo (distributed training)
  libopenblas0-openmp     # fast BLAS behind LibTorch (reference BLAS is ~20x slower)
  libdnnl-dev             # oneDNN (LibTorch's): Winograd convolutions
  ocl-icd-opencl-dev      # OpenCL, which oneDNN's CMake package requires
  libgoogle-perftools-dev # tcmalloc, linked into every program
  libgtest-dev libgmock-dev
  libbenchmark-dev
  libcli11-dev
  zlib1g-dev              # gzip-compressed IDX files
  libjpeg62-turbo-dev     # Tiny-ImageNet JPEG decoding
  nlohmann-json3-dev
  libtomlplusplus-dev     # TOML grid files of `largebatch sweep`
  dataset-fashion-mnist   # real data present on every machine
  gnuplot-nox             # plots in reports
  iproute2                # network namespaces: the two-host data-parallel test
)
if [ "${1:-}" = "--bench" ]; then
  PACKAGES+=(python3-torch python3-torchvision)
fi
if [ "${1:-}" = "--python" ] || [ "${1:-}" = "--bench" ]; then
  # the Python package (largebatch.optim, build/python) and its tests
  PACKAGES+=(python3-torch python3-dev pybind11-dev python3-pytest)
fi
if [ "${1:-}" = "--sanitize" ]; then
  # libomp-dev: OpenMP for clang; llvm: llvm-symbolizer, for sanitizer reports with file:line
  PACKAGES+=(clang libclang-rt-dev libomp-dev llvm)
fi

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "setup: all ${#PACKAGES[@]} packages present"
fi

# LibTorch links the generic libblas.so.3; make sure the alternative points at OpenBLAS.
ALT=libblas.so.3-x86_64-linux-gnu
OPENBLAS=/usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3
if [ -e "$OPENBLAS" ] && command -v update-alternatives >/dev/null; then
  current=$(update-alternatives --query "$ALT" 2>/dev/null | awk '/^Value:/{print $2}')
  if [ "$current" != "$OPENBLAS" ]; then
    echo "setup: selecting OpenBLAS for $ALT"
    $SUDO update-alternatives --set "$ALT" "$OPENBLAS"
  fi
fi
