#!/usr/bin/env bash
# Cross-build of the CPU extension itm_kernels._C for aarch64 Linux, and (where it can) a smoke test of it.
#
#   bash tools/cross_build_aarch64.sh            # build; run the smoke test if qemu and an aarch64 Python are set up
#   bash tools/cross_build_aarch64.sh --fetch    # first download the aarch64 torch wheel (network; once)
#
# What it proves: every C++ translation unit of the CPU extension (csrc/module.cpp, csrc/common/isa.cpp,
# csrc/*/cpu.cpp: setup.py's list) compiles for aarch64 without x86 intrinsics, cpuid or target attributes (the
# portable path: simd_clones.h builds the baseline version alone there), with setup.py's flags and defines, and
# links against the aarch64 libtorch. Prints "cross_build_aarch64: OK" or "cross_build_aarch64: FAIL"; exits 0
# with "SKIP" when the toolchain or the aarch64 torch is absent (an optional step of .ci/run; never installs).
#
# Needs (Debian/Ubuntu; nothing here is installed by the script):
#   - the cross compiler: apt-get install g++-aarch64-linux-gnu   (AARCH64_CXX overrides the name);
#   - the aarch64 torch wheel unpacked in $AARCH64_DIR/site (default /tmp/itm-aarch64/site): --fetch does
#     `pip download torch==$AARCH64_TORCH_VERSION --platform manylinux_2_28_aarch64` (default 2.9.1, a CPU wheel
#     that exists for aarch64) for the host Python's version and unzips it; PYTHON (default python3) is that Python.
#   - Python headers: the aarch64 ones in $AARCH64_DIR/root/usr/include (libpython3.X-dev:arm64 unpacked there, see
#     below) if present, else the host Python's (the C API headers are the same on both 64-bit Linux ABIs).
# The smoke test (tools/portable_smoke.py: build_info reports the portable path; xattn_sim, local_sim, node_match
# against the float64 references) runs under qemu-user when all of these exist, and is reported as not run else:
#   - qemu-aarch64 (apt-get install qemu-user);
#   - an aarch64 root with CPython of the host Python's version in $AARCH64_DIR/root: with Debian's multiarch
#     (dpkg --add-architecture arm64; apt-get update), `apt-get download` python3.X-minimal, libpython3.X-minimal,
#     libpython3.X-stdlib, libpython3.X-dev, libc6, libstdc++6, libgcc-s1, libgomp1, zlib1g, libexpat1, libffi8,
#     libssl3, libbz2-1.0, liblzma5, libuuid1, libcrypt1 (all :arm64) and `dpkg-deb -x` each into the root
#     (no install: the arm64 python3 package cannot be installed beside the amd64 one);
#   - torch's pure-Python dependencies and the package's for aarch64 in $AARCH64_DIR/site: `pip install --target
#     $AARCH64_DIR/site --only-binary=:all: --platform manylinux2014_aarch64 --python-version 3.X typing_extensions
#     filelock sympy networkx jinja2 fsspec numpy tqdm`.
# Tests under qemu: python -m pytest runs with that CPython too; for tests that start child processes
# (sys.executable) without binfmt_misc, run it through a wrapper script that execs
# `qemu-aarch64 -L $ROOT -0 "$0" $ROOT/usr/bin/python3.X "$@"` (so sys.executable is the wrapper) and appends
# $AARCH64_DIR/site to PYTHONPATH; tests/cpu_isa took about 4 minutes that way (ARCHITECTURE.md has the counts).
# Verified (Debian 12, x86-64 host): aarch64-linux-gnu-g++ 12.2.0, torch 2.9.1 aarch64, Debian's CPython 3.11.2
# arm64 under qemu-aarch64 7.2: builds, links, smoke test passes. Not verified: macOS arm64 (Apple clang), or
# timings of any kind (qemu says nothing about speed).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
CXX_A64=${AARCH64_CXX:-aarch64-linux-gnu-g++}
A64=${AARCH64_DIR:-/tmp/itm-aarch64}
TORCH_VERSION=${AARCH64_TORCH_VERSION:-2.9.1}
PY=${PYTHON:-python3}
OUT=${OUT_DIR:-$REPO/build/cross-aarch64}
FETCH=0
[ "${1:-}" = "--fetch" ] && FETCH=1

skip() { echo "cross_build_aarch64: SKIP ($*)"; exit 0; }
fail() { echo "cross_build_aarch64: FAIL ($*)"; exit 1; }

command -v "$CXX_A64" >/dev/null || skip "no $CXX_A64; Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu"
command -v "$PY" >/dev/null || skip "no host Python '$PY' (set PYTHON)"
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
CPTAG=cp${PYVER/./}
SITE=$A64/site
if [ ! -f "$SITE/torch/include/torch/extension.h" ]; then
    [ "$FETCH" = 1 ] || skip "no aarch64 torch in $SITE; run once with --fetch (downloads torch==$TORCH_VERSION)"
    mkdir -p "$A64/wheels" "$SITE"
    "$PY" -m pip download -q "torch==$TORCH_VERSION" --platform manylinux_2_28_aarch64 --python-version "$PYVER" \
        --implementation cp --only-binary=:all: --no-deps -d "$A64/wheels" || fail "pip download of torch failed"
    wheel=$(ls "$A64"/wheels/torch-"$TORCH_VERSION"-"$CPTAG"-*aarch64.whl 2>/dev/null | head -1)
    [ -n "$wheel" ] || fail "no torch $TORCH_VERSION $CPTAG aarch64 wheel in $A64/wheels"
    "$PY" -m zipfile -e "$wheel" "$SITE" || fail "cannot unzip $wheel"
fi
TORCH=$SITE/torch
ROOT=$A64/root
if [ -f "$ROOT/usr/include/python$PYVER/Python.h" ]; then
    # Debian's pyconfig.h includes <aarch64-linux-gnu/python3.X/pyconfig.h>: the root's include dir, searched
    # after the cross toolchain's own headers.
    PY_INC=(-I"$ROOT/usr/include/python$PYVER" -idirafter "$ROOT/usr/include")
    py_inc_from="aarch64 libpython$PYVER-dev"
else
    PY_INC=(-I"$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')")
    py_inc_from="host Python $PYVER headers"
fi

# setup.py's compile flags and defines (cxx list of _extensions(); -fopenmp: gcc's libgomp, as torch's wheel).
FLAGS=(-std=c++17 -O2 -g0 -fPIC -fopenmp -fno-math-errno -fno-trapping-math -Wall -Wno-unknown-pragmas -Wno-psabi
       -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
       -I"$REPO/csrc" -I"$TORCH/include" -I"$TORCH/include/torch/csrc/api/include" "${PY_INC[@]}")
SOURCES=(csrc/module.cpp csrc/common/isa.cpp $(ls csrc/*/cpu.cpp))
mkdir -p "$OUT/obj"
# Other flags (headers, compiler) than the objects were built with: rebuild them all.
stamp="$CXX_A64 ${FLAGS[*]}"
[ "$(cat "$OUT/obj/flags" 2>/dev/null)" = "$stamp" ] || rm -f "$OUT"/obj/*.o
echo "$stamp" > "$OUT/obj/flags"
echo "cross_build_aarch64: $("$CXX_A64" --version | head -1); torch $TORCH_VERSION aarch64 ($SITE); $py_inc_from"
start=$SECONDS
objs=()
for src in "${SOURCES[@]}"; do
    obj=$OUT/obj/$(echo "$src" | tr / _).o
    objs+=("$obj")
    # Idempotent: a unit is rebuilt only when its object is missing or some csrc file is newer than it.
    if [ -f "$obj" ] && [ -z "$(find csrc -newer "$obj" -print -quit)" ]; then continue; fi
    echo "  compile $src"
    "$CXX_A64" "${FLAGS[@]}" -c "$src" -o "$obj.tmp" || { rm -f "$obj.tmp"; fail "$src does not compile for aarch64"; }
    mv "$obj.tmp" "$obj"
done
# The package to import on aarch64: this tree's Python files beside the aarch64 _C.
SO=$OUT/pkg/itm_kernels/_C.cpython-${PYVER/./}-aarch64-linux-gnu.so
rm -rf "$OUT/pkg"
mkdir -p "$OUT/pkg"
find itm_kernels -name '*.py' -print0 | xargs -0 cp --parents -t "$OUT/pkg" || fail "cannot stage itm_kernels"
"$CXX_A64" -shared -fopenmp "${objs[@]}" -L"$TORCH/lib" -Wl,-rpath-link,"$SITE/torch.libs" \
    -lc10 -ltorch -ltorch_cpu -ltorch_python -o "$SO" || fail "link against the aarch64 libtorch failed"
machine=$(readelf -h "$SO" | awk -F: '/Machine/ {gsub(/^ +/, "", $2); print $2}')
[ "$machine" = "AArch64" ] || fail "$SO is for '$machine', not AArch64"
echo "  linked $SO ($machine, $((SECONDS - start)) s)"

why_not=""
if ! command -v qemu-aarch64 >/dev/null; then
    why_not="no qemu-aarch64 (apt-get install qemu-user)"
elif [ ! -x "$ROOT/usr/bin/python$PYVER" ]; then
    why_not="no aarch64 CPython $PYVER in $ROOT (see this script's header)"
fi
if [ -n "$why_not" ]; then
    echo "cross_build_aarch64: OK (built and linked for aarch64; smoke test not run: $why_not)"
    exit 0
fi
echo "  smoke test under qemu-aarch64 (tens of seconds: torch's import is emulated)"
qemu-aarch64 -L "$ROOT" -E PYTHONPATH="$OUT/pkg:$SITE" -E OMP_NUM_THREADS=2 "$ROOT/usr/bin/python$PYVER" \
    "$REPO/tools/portable_smoke.py" 2>&1 | grep -v "MIDR_EL1" | sed 's/^/    /'
[ "${PIPESTATUS[0]}" = 0 ] || fail "the smoke test under qemu-aarch64 failed"
echo "cross_build_aarch64: OK (built, linked and smoke-tested on aarch64 under qemu-user)"
