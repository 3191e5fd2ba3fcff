#!/usr/bin/env bash
# Install everything tinymed needs into ./.venv (CPU PyTorch 2.13.0 from the pinned wheel), plus
# Debian's Chromium for the browser test when it is missing and apt-get can install it.
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Debian chromium (browser test)..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

PYTHON=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip

# The llama.cpp engine (extra `edge`): llama-cpp-python has no wheel here and compiles from its sdist
# (≈9 min on 2 cores, once). pip does not install llama.cpp's HF→GGUF converter, so the same sdist's
# vendor/llama.cpp/{convert_hf_to_gguf.py,conversion,gguf-py} is kept in .venv/share/llama.cpp/VERSION.
# Built without ggml's AMX kernels: on Intel Xeons with AMX, -march=native compiles them in, and they
# crash (segfault in ggml_backend_amx_mul_mat, measured 2026-12-05 on a q4_0 tiny Gemma; likely also that
# day's CI crash in an f16 test; upstream llama.cpp issue 20824 reports a segfault in the same function).
# A build that has them is rebuilt. The flags only exist on x86-64; elsewhere there is no AMX to drop.
LLAMA_CPP=0.3.36
LLAMA_SRC=.venv/share/llama.cpp/$LLAMA_CPP
LLAMA_CMAKE_ARGS=""
[ "$(uname -m)" = x86_64 ] && LLAMA_CMAKE_ARGS="-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \
-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'"
if ! .venv/bin/python -c "import llama_cpp, sys; sys.exit(b'AMX_INT8 = 1' in llama_cpp.llama_print_system_info())" \
    2>/dev/null || [ ! -f "$LLAMA_SRC/convert_hf_to_gguf.py" ]; then
  echo "building llama-cpp-python $LLAMA_CPP from source (about 9 minutes)..."
  sdist_dir=$(mktemp -d)
  .venv/bin/pip download -q --no-deps --no-binary :all: -d "$sdist_dir" "llama-cpp-python==$LLAMA_CPP"
  .venv/bin/pip uninstall -q -y llama-cpp-python 2>/dev/null || true
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) .venv/bin/pip install -q --no-cache-dir \
    "$sdist_dir"/llama_cpp_python-$LLAMA_CPP.tar.gz
  mkdir -p "$LLAMA_SRC"
  tar xzf "$sdist_dir"/llama_cpp_python-$LLAMA_CPP.tar.gz -C "$LLAMA_SRC" --strip-components=3 \
    "llama_cpp_python-$LLAMA_CPP/vendor/llama.cpp/convert_hf_to_gguf.py" \
    "llama_cpp_python-$LLAMA_CPP/vendor/llama.cpp/conversion" "llama_cpp_python-$LLAMA_CPP/vendor/llama.cpp/gguf-py"
  rm -rf "$sdist_dir"
fi
.venv/bin/pip install -q -e ".[dev]"
# optimum-quanto compiles its CPU int4 kernels (quanto_cpp) on first use, into the venv: ≈45 s on 2 cores,
# measured 2026-12-03 as the first `tinymed demo`'s FQ4 evaluation taking 54 s instead of 11. Do it now.
echo "building optimum-quanto's CPU kernels (once)..."
if ! .venv/bin/python -c "from optimum.quanto.library.extensions.cpp import ext; ext.lib" >.venv/quanto-build.log 2>&1; then
  cat .venv/quanto-build.log; exit 1
fi
.venv/bin/tinymed --version
