#!/usr/bin/env bash
# Build llama.cpp's own OpenAI-compatible server, llama-server (what FlagScale's llama_cpp engine starts), and put
# it beside the environment's python.
#
#   bash install/build-llama-cpp.sh --venv .venv --backend cpu|cuda
#
# The source is the llama.cpp tree inside PyPI's llama-cpp-python source distribution (the version in
# requirements/llama-cpp.txt), so only the package index is needed. The build (cmake + the C++ compiler; minutes
# on 2 cores) is kept under ${XDG_CACHE_HOME:-~/.cache}/flagscale/llama.cpp/, keyed by version, backend and this
# CPU's instruction set (the CPU build is -march=native), and reused by later installs on the same machine.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"
backend=cpu
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) venv="${2:-}"; shift 2 ;;
    --backend) backend="${2:-}"; shift 2 ;;
    -h|--help) sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-llama-cpp.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$backend" in
  cpu) cmake_backend=() ;;
  cuda) cmake_backend=(-DGGML_CUDA=ON) ;;
  *) echo "build-llama-cpp.sh: --backend must be cpu or cuda (got '$backend')" >&2; exit 2 ;;
esac
for tool in cmake c++ tar; do
  command -v "$tool" >/dev/null || { echo "build-llama-cpp.sh: '$tool' not found; install it (Debian: apt-get install cmake g++)" >&2; exit 2; }
done
[ -x "$venv/bin/python" ] || { echo "build-llama-cpp.sh: no environment at $venv; run install-requirements.sh first" >&2; exit 2; }

version=$(sed -n 's/^llama-cpp-python==\([0-9.]*\).*/\1/p' "$repo/requirements/llama-cpp.txt")
[ -n "$version" ] || { echo "build-llama-cpp.sh: no llama-cpp-python==VERSION in requirements/llama-cpp.txt" >&2; exit 2; }
cpu=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | sha256sum | cut -c1-12)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/flagscale/llama.cpp/${version}-${backend}-${cpu}"

if [ ! -x "$cache/bin/llama-server" ]; then
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  echo "==> llama.cpp: fetching the llama-cpp-python ${version} source distribution"
  "$venv/bin/python" -m pip download --disable-pip-version-check --quiet --no-deps --no-binary :all: \
    "llama-cpp-python==${version}" -d "$scratch"
  tar -xzf "$scratch"/llama_cpp_python-"${version}".tar.gz -C "$scratch"
  src="$scratch/llama_cpp_python-${version}/vendor/llama.cpp"
  echo "==> llama.cpp: building llama-server (${backend}; minutes on a small machine)"
  started=$(date +%s)
  cmake -S "$src" -B "$scratch/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF "${cmake_backend[@]}" >"$scratch/cmake.log" 2>&1 \
    || { tail -20 "$scratch/cmake.log" >&2; exit 1; }
  cmake --build "$scratch/build" --target llama-server -j "$(nproc)" >"$scratch/build.log" 2>&1 \
    || { tail -20 "$scratch/build.log" >&2; exit 1; }
  mkdir -p "$cache/bin"
  cp "$scratch/build/bin/llama-server" "$cache/bin/llama-server.tmp" && mv "$cache/bin/llama-server.tmp" "$cache/bin/llama-server"
  echo "==> llama.cpp: built in $(( $(date +%s) - started )) s; kept in $cache"
fi
ln -sf "$cache/bin/llama-server" "$venv/bin/llama-server"
"$venv/bin/llama-server" --version 2>&1 | grep -m1 -i version || true
echo "==> llama.cpp: $venv/bin/llama-server"
