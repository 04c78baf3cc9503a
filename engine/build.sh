#!/usr/bin/env bash
# Build llama.cpp's llama-server from the llama.cpp source that PyPI's
# llama-cpp-python sdist carries under vendor/llama.cpp.
#
# Usage: engine/build.sh VERSION ENGINE_DIR PYTHON [NINJA]
#   VERSION     llama-cpp-python version whose sdist is built, e.g. 0.3.36
#   ENGINE_DIR  output folder: bin/llama-server, cache/ (the sdist),
#               and src/ and build/ while building
#   PYTHON      interpreter whose pip downloads the sdist
#   NINJA       path of a ninja binary; without it CMake writes Makefiles
#
# Does nothing when ENGINE_DIR/bin/llama-server exists and was built from
# the same VERSION. Set ENGINE_KEEP_BUILD=1 to keep the source and build
# trees (about 500 MB) after a successful build.
set -euo pipefail

if [[ $# -lt 3 ]]; then
    echo "usage: $0 VERSION ENGINE_DIR PYTHON [NINJA]" >&2
    exit 2
fi
version=$1
engine_dir=$(realpath -m "$2")
python=$3
ninja=${4:-}
here=$(cd "$(dirname "$0")" && pwd)

binary=$engine_dir/bin/llama-server
stamp=$engine_dir/bin/llama-server.version
wanted="llama-cpp-python==$version"
if [[ -x $binary && -f $stamp && $(cat "$stamp") == "$wanted" ]]; then
    echo "engine: $binary is up to date ($wanted)"
    exit 0
fi

SECONDS=0
sdist=$engine_dir/cache/llama_cpp_python-$version.tar.gz
if [[ ! -f $sdist ]]; then
    echo "engine: downloading the $wanted sdist"
    mkdir -p "$engine_dir/cache"
    "$python" -m pip download --quiet --no-deps --no-binary :all: \
        --dest "$engine_dir/cache" "$wanted"
fi
if [[ ! -f $sdist ]]; then
    echo "engine: pip did not write $sdist; check the version" >&2
    exit 1
fi

# Only the vendored llama.cpp tree is needed from the sdist.
src=$engine_dir/src/llama.cpp-$version
build=$engine_dir/build/llama.cpp-$version
rm -rf "$src" "$build"
mkdir -p "$src"
tar -xzf "$sdist" -C "$src" --strip-components=3 \
    "llama_cpp_python-$version/vendor/llama.cpp"

generator=(-G "Unix Makefiles")
if [[ -n $ninja ]]; then
    generator=(-G Ninja "-DCMAKE_MAKE_PROGRAM=$ninja")
fi

# Offline-safe: the server's web UI is neither built (needs npm) nor
# downloaded (LLAMA_USE_PREBUILT_UI fetches it over HTTPS at build time),
# and HTTPS support (OpenSSL) is left out because the server only listens
# on 127.0.0.1 here. GGML_NATIVE tunes the code for this CPU, so the
# binary runs only on machines like the one that built it.
echo "engine: configuring llama.cpp from $wanted in $build"
cmake -S "$src" -B "$build" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    "-DCMAKE_C_COMPILER_LAUNCHER=$here/compile.sh;$src" \
    "-DCMAKE_CXX_COMPILER_LAUNCHER=$here/compile.sh;$src" \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF \
    >"$engine_dir/configure.log" 2>&1 || {
    tail -n 30 "$engine_dir/configure.log" >&2
    echo "engine: cmake configure failed; full log in $engine_dir/configure.log" >&2
    exit 1
}

# nice: timing-sensitive tests may share the machine during the build.
echo "engine: compiling llama-server (several minutes on 2 cores)"
jobs=$(nproc)
nice -n 10 cmake --build "$build" --target llama-server --parallel "$jobs" \
    >"$engine_dir/build.log" 2>&1 || {
    tail -n 30 "$engine_dir/build.log" >&2
    echo "engine: build failed; full log in $engine_dir/build.log" >&2
    exit 1
}

mkdir -p "$engine_dir/bin"
cp "$build/bin/llama-server" "$binary.tmp"
mv "$binary.tmp" "$binary"
echo "$wanted" >"$stamp"
build_size=$(du -sh "$engine_dir/src" "$engine_dir/build" | awk '{print $1}' | paste -sd+)
if [[ ${ENGINE_KEEP_BUILD:-0} != 1 ]]; then
    rm -rf "$engine_dir/src" "$engine_dir/build"
fi
echo "engine: built $binary ($(du -h "$binary" | cut -f1)) in ${SECONDS}s;" \
    "source+build trees were $build_size"
