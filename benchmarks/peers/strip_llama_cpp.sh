#!/usr/bin/env bash
# Rebuild benchmarks/peers/llama.cpp.tar.xz from the llama-cpp-python sdist on PyPI (its vendored llama.cpp),
# keeping only what a CPU or CUDA build of llama-bench / llama-batched-bench / llama-completion and the HF -> GGUF
# converter need. Run here (with network to PyPI), never on the GPU machine:
#   bash benchmarks/peers/strip_llama_cpp.sh [VERSION]      # default 0.3.36
set -euo pipefail
VERSION=${1:-0.3.36}
HERE=$(cd "$(dirname "$0")" && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python3 -m pip download --quiet --no-deps --no-binary :all: -d "$TMP" "llama-cpp-python==$VERSION"
tar -xzf "$TMP/llama_cpp_python-$VERSION.tar.gz" -C "$TMP"
SRC=$TMP/llama_cpp_python-$VERSION/vendor/llama.cpp
DST=$TMP/llama.cpp
mkdir -p "$DST/tools" "$DST/ggml/src"
# top level: build system, sources, converter
cp -r "$SRC"/{CMakeLists.txt,LICENSE,cmake,common,include,src,vendor,licenses} "$DST/"
cp -r "$SRC"/{convert_hf_to_gguf.py,conversion,gguf-py} "$DST/"
rm -rf "$DST/vendor/miniaudio"  # audio (tts / mtmd), not built here
# ggml: core + CPU + CUDA backends only
cp -r "$SRC"/ggml/{CMakeLists.txt,cmake,include} "$DST/ggml/"
find "$SRC/ggml/src" -maxdepth 1 -type f -exec cp {} "$DST/ggml/src/" \;
cp -r "$SRC"/ggml/src/{ggml-cpu,ggml-cuda} "$DST/ggml/src/"
# tools: the three benchmarks/runners; tools/CMakeLists.txt and vendor/CMakeLists.txt cut to match
cp -r "$SRC"/tools/{llama-bench,batched-bench,completion} "$DST/tools/"
cat > "$DST/tools/CMakeLists.txt" <<'CM'
# moeflow benchmarks/peers: stripped to the tools it runs (see strip_llama_cpp.sh)
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(batched-bench)
add_subdirectory(llama-bench)
add_subdirectory(completion)
CM
sed -i 's|^add_subdirectory(miniaudio)|# add_subdirectory(miniaudio)  # stripped|' "$DST/vendor/CMakeLists.txt"
rm -rf "$DST/gguf-py/tests" "$DST/gguf-py/examples"
sed -n '/^## \['"$VERSION"'\]/,/^## \[/p' "$TMP/llama_cpp_python-$VERSION/CHANGELOG.md" | grep -o 'ggml-org/llama.cpp@[0-9a-f]*' | head -1 > "$DST/MOEFLOW_SOURCE"
echo "llama-cpp-python==$VERSION sdist (PyPI), vendor/llama.cpp, stripped by benchmarks/peers/strip_llama_cpp.sh" >> "$DST/MOEFLOW_SOURCE"
tar -C "$TMP" -cJf "$HERE/llama.cpp.tar.xz" llama.cpp
du -sh "$DST" "$HERE/llama.cpp.tar.xz"
cat "$DST/MOEFLOW_SOURCE"
