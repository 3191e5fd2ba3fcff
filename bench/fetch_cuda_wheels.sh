#!/usr/bin/env bash
# Fetch, where pip works, the wheels bench/cuda_quant_profile.sh needs on an offline GPU machine whose image
# has a CUDA PyTorch and transformers but not pydantic or bitsandbytes (Python 3.12, x86-64 Linux).
# They land in .whl/ (git-ignored, ≈46 MB); carry that folder to the GPU machine beside the checkout.
#
#   bash bench/fetch_cuda_wheels.sh [PYTHON_VERSION]      # default 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION="${1:-3.12}"
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64; do
  PLATFORMS+=(--platform "$tag")
done
rm -rf .whl
# pydantic pins pydantic-core exactly: fetch the pair together, with their small pure-Python needs.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${PLATFORMS[@]}" -d .whl "bitsandbytes==0.50.2" "pydantic==2.14.4" "pydantic-core==2.50.5" \
  "annotated-types>=0.6" "typing-inspection>=0.4.4" "typing-extensions>=4.16"
ls -l .whl
