#!/usr/bin/env bash
# Build check with clang: the extension built by clang++ (runtime SIMD dispatch through x86 target attributes,
# LLVM's OpenMP runtime) imports, reports its compiler and dispatch, and passes tests/cpu_isa (the kernels at every
# SIMD level this CPU runs, forced in one process, plus the ITM_KERNELS_ISA switch).
#
#   bash tools/clang_build_check.sh          # CLANGXX (default clang++), PYTHON (default python), MAX_JOBS (2)
#
# Builds in a temporary copy of the tree (tracked and untracked-but-not-ignored files), so this tree's own _C is
# left alone. Prints "clang_build_check: OK" or "clang_build_check: FAIL"; exits 0 with "SKIP" when clang++ or
# its OpenMP runtime (Debian/Ubuntu: apt-get install clang libomp-dev) is absent: an optional step of .ci/run,
# which never installs it. About 1-2 minutes on 2 cores.
# Verified: Debian clang 14.0.6 on x86-64 (AVX-512); the full kernel test directories also pass with it at the
# native, avx2 and baseline levels (ARCHITECTURE.md, "Compilers and platforms").
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
CLANGXX=${CLANGXX:-clang++}
PY=${PYTHON:-python}

skip() { echo "clang_build_check: SKIP ($*)"; exit 0; }
fail() { echo "clang_build_check: FAIL ($*)"; exit 1; }

command -v "$CLANGXX" >/dev/null || skip "no $CLANGXX; Debian/Ubuntu: apt-get install clang libomp-dev"
probe=$(mktemp -d)
stage=$(mktemp -d)
trap 'rm -rf "$probe" "$stage"' EXIT
printf '#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n' > "$probe/omp.cpp"
"$CLANGXX" -fopenmp "$probe/omp.cpp" -o "$probe/omp" 2>/dev/null \
    || skip "$CLANGXX cannot link OpenMP code (LLVM's libomp missing; Debian/Ubuntu: apt-get install libomp-dev)"
echo "clang_build_check: $("$CLANGXX" --version | head -1)"

git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$stage" 2>/dev/null \
    || fail "cannot copy the tree to $stage"
start=$SECONDS
(cd "$stage" && CC="${CLANGXX%++}" CXX="$CLANGXX" MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext --inplace \
    > "$stage/build.log" 2>&1) || { tail -30 "$stage/build.log"; fail "the clang build failed"; }
echo "  built in $((SECONDS - start)) s"
if grep -q "warning:" "$stage/build.log"; then
    grep "warning:" "$stage/build.log" | sort | uniq -c | head -20
    fail "the clang build printed warnings"
fi
export ITM_GOLDEN_DIR=${ITM_GOLDEN_DIR:-$(cd "$REPO/.." && pwd)/shared/reference/golden}
(cd "$stage" && env -u ITM_KERNELS_ISA PYTHONPATH="$stage" "$PY" -c "
import platform, itm_kernels
i = itm_kernels.build_info()
print('  compiler:', i['compiler'], '| openmp:', i['openmp_runtime'], '| simd:', i['simd'], '|', i['simd_dispatch'])
assert i['compiler'].startswith('clang'), i['compiler']
assert i['openmp'] and i['openmp_runtime'] == 'libomp', i
assert i['simd_dispatch'].startswith('runtime') or platform.machine() not in ('x86_64', 'AMD64'), i
") || fail "the clang-built extension does not report a clang build with runtime dispatch"
# pipefail (inherited by the subshell): pytest's status, not tail's.
(cd "$stage" && PYTHONPATH="$stage" "$PY" -m pytest -q -p no:cacheprovider tests/cpu_isa 2>&1 | tail -3) \
    || fail "tests/cpu_isa failed with the clang build"
echo "clang_build_check: OK (clang build with runtime dispatch passes tests/cpu_isa)"
