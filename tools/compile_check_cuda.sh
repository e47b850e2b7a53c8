#!/usr/bin/env bash
# Compile-check the CUDA kernels without a GPU.
#
#   1. nvcc -std=c++17 for sm_80 and sm_90 (one invocation per check file): csrc/xattn_sim/compile_check.cu
#      instantiates every dtype x direction variant of csrc/xattn_sim/kernel.cuh, csrc/node_match/compile_check.cu
#      every dtype of csrc/node_match/kernel.cuh, csrc/local_sim/compile_check.cu every dtype of
#      csrc/local_sim/kernel.cuh; prints registers / spills / stack per kernel (ptxas -v) and one summary line
#      per arch ("sm_80: OK ..." for xattn_sim, "node_match sm_80: OK ..." and "local_sim sm_80: OK ..." for the
#      others);
#   2. g++ -fsyntax-only of csrc/xattn_sim/math.h and csrc/common/constants.h alone (the headers the CPU kernels
#      share);
#   3. g++ builds of the host emulations csrc/xattn_sim/emulate.cpp, csrc/node_match/emulate.cpp and
#      csrc/local_sim/emulate.cpp (AddressSanitizer + UBSan), which run the kernels' block code on the CPU; prints the
#      launch plans (dynamic shared memory) for typical and maximal shapes;
#   4. with --binding: nvcc -c of the torch bindings csrc/xattn_sim/cuda.cu, csrc/node_match/cuda.cu and
#      csrc/local_sim/cuda.cu against the installed torch's headers (about 40 s each; works with a CPU-only torch too,
#      the objects are not linked).
#
# Usage: tools/compile_check_cuda.sh [--only xattn|node_match|local_sim] [--emulator PATH]
#                                    [--node-match-emulator PATH] [--local-sim-emulator PATH] [--binding] [--no-nvcc]
#   --only KERNEL              check one kernel's files only (default: all three)
#   --no-nvcc                  skip step 1 (the nvcc compiles, ~40 s per kernel): steps 2 and 3 only (the default
#                              test run builds its emulators so; CI runs this script in full)
#   --emulator PATH            keep the xattn_sim emulator binary at PATH (tests/xattn_sim/test_xattn_sim_cuda.py
#                              runs it)
#   --node-match-emulator PATH keep the node_match emulator binary at PATH (tests/node_match/test_node_match_cuda.py)
#   --local-sim-emulator PATH  keep the local_sim emulator binary at PATH (tests/local_sim/test_local_sim_cuda.py)
# Environment: NVCC (default nvcc), CXX (default g++), CUDA_HOME (default: from nvcc), PYTHON (for --binding).
# Exits non-zero on the first failing step.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"
CXX="${CXX:-g++}"
emulator=""
nm_emulator=""
ls_emulator=""
binding=0
only=""
nvcc_compile=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --emulator) emulator="$2"; shift 2 ;;
    --node-match-emulator) nm_emulator="$2"; shift 2 ;;
    --local-sim-emulator) ls_emulator="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    --binding) binding=1; shift ;;
    --no-nvcc) nvcc_compile=0; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
case "$only" in
  "") do_xattn=1; do_nm=1; do_ls=1 ;;
  xattn) do_xattn=1; do_nm=0; do_ls=0 ;;
  node_match) do_xattn=0; do_nm=1; do_ls=0 ;;
  local_sim) do_xattn=0; do_nm=0; do_ls=1 ;;
  *) echo "--only takes xattn, node_match or local_sim, got: $only" >&2; exit 2 ;;
esac

command -v "$NVCC" >/dev/null || { echo "nvcc not found (set NVCC)" >&2; exit 127; }
if [[ -z "${CUDA_HOME:-}" ]]; then
  # nvcc may be a wrapper script; ask it where its own headers are.
  inc="$("$NVCC" -v -x cu -E /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n1 | tr -d ' ' || true)"
  CUDA_INC="${inc:-/usr/local/cuda/include}"
else
  CUDA_INC="$CUDA_HOME/include"
fi
[[ -f "$CUDA_INC/cuda_bf16.h" ]] || { echo "cuda_bf16.h not found under $CUDA_INC (set CUDA_HOME)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
demangle() { if command -v c++filt >/dev/null; then c++filt; else cat; fi; }

# --- 1. nvcc, both architectures in one invocation per check file -------------------------------------------------
# The -D__CUDA_NO_* flags are those torch's cpp_extension passes: the kernels must not rely on implicit half
# conversions.
nvcc_flags=(-std=c++17 -O3 -Xptxas -v --threads 2
  -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror -I "$root/csrc")
# nvcc_check FILE PREFIX: compile csrc/FILE (OP/compile_check.cu), print the per-kernel table and "<PREFIX>sm_XX: OK ..." lines.
nvcc_check() {
  local file="$1" prefix="$2" tag
  tag="${file%%/*}"
  local start=$SECONDS
  if ! "$NVCC" "${nvcc_flags[@]}" -c "$root/csrc/$file" -o "$work/$tag.o" >"$work/$tag.nvcc.log" 2>&1; then
    grep -v '^ptxas info' "$work/$tag.nvcc.log" >&2 || true
    echo "FAIL nvcc: csrc/$file (sm_80, sm_90)" >&2
    exit 1
  fi
  local nvcc_s=$((SECONDS - start))
  # ptxas -v prints, per kernel: "Compiling entry function 'NAME' for 'sm_XX'", "... N bytes stack frame, S bytes
  # spill stores, L bytes spill loads", "Used R registers, ...".
  awk '
    /Compiling entry function/ { match($0, /function .[^'"'"']*/); fn = substr($0, RSTART + 10, RLENGTH - 10);
                                 match($0, /for .sm_[0-9]+/); arch = substr($0, RSTART + 5, RLENGTH - 5) }
    /bytes stack frame/        { stack = $1; spill = $5 + $9 }
    /Used [0-9]+ registers/    { match($0, /Used [0-9]+/); regs = substr($0, RSTART + 5, RLENGTH - 5);
                                 print arch, regs, spill, stack, fn }
  ' "$work/$tag.nvcc.log" > "$work/$tag.kernels.txt"
  [[ -s "$work/$tag.kernels.txt" ]] || { cat "$work/$tag.nvcc.log" >&2; echo "FAIL: no ptxas report for $file" >&2; exit 1; }
  printf '%-6s %5s %11s %11s  %s\n' arch regs spill_bytes stack_bytes kernel
  sort -k1,1 -k5 "$work/$tag.kernels.txt" | while read -r arch regs spill stack fn; do
    printf '%-6s %5s %11s %11s  %s\n' "$arch" "$regs" "$spill" "$stack" "$(echo "$fn" | demangle)"
  done
  for arch in sm_80 sm_90; do
    awk -v a="$arch" -v p="$prefix" '$1 == a { n++; if (min == "" || $2 < min) min = $2; if ($2 > max) max = $2; sp += $3;
                                if ($4 > st) st = $4 }
      END { if (n == 0) { print p a ": FAIL no kernels"; exit 1 }
            printf "%s%s: OK %d kernels, %d-%d registers, %d bytes spilled in total, stack <= %d bytes\n", p, a, n, min, max, sp, st }' \
      "$work/$tag.kernels.txt"
  done
  echo "${prefix}nvcc: ${nvcc_s}s for both architectures"
}
if [[ $nvcc_compile == 1 ]]; then
  [[ $do_xattn == 1 ]] && nvcc_check xattn_sim/compile_check.cu ""
  [[ $do_nm == 1 ]] && nvcc_check node_match/compile_check.cu "node_match "
  [[ $do_ls == 1 ]] && nvcc_check local_sim/compile_check.cu "local_sim "
else
  echo "nvcc compiles skipped (--no-nvcc)"
fi

# --- 2. the shared math headers alone under g++ -------------------------------------------------------------------
for header in common/constants.h xattn_sim/math.h; do
  echo "#include \"$header\"" | "$CXX" -std=c++17 -fsyntax-only -Wall -Wextra -Werror -I "$root/csrc" -x c++ -
  echo "g++: csrc/$header compiles alone"
done

# --- 3. host emulation ---------------------------------------------------------------------------------------------
emu_flags=(-std=c++17 -O1 -g -Wall -Wextra -Werror -I "$root/csrc" -I "$CUDA_INC")
sanitize=(-fsanitize=address,undefined -fno-sanitize-recover=undefined)
# build_emulator SOURCE OUT: g++ with the sanitizers where the toolchain has them, without otherwise.
build_emulator() {
  local src="$1" out="$2"
  mkdir -p "$(dirname "$out")"
  if "$CXX" "${emu_flags[@]}" "${sanitize[@]}" "$root/csrc/$src" -o "$out" 2> "$work/emu.log"; then
    echo "g++: host emulation built with ASan/UBSan (${out})"
  elif "$CXX" "${emu_flags[@]}" "$root/csrc/$src" -o "$out"; then
    echo "g++: host emulation built WITHOUT sanitizers (${out}); with them: $(head -n1 "$work/emu.log")"
  else
    echo "FAIL g++: csrc/$src" >&2
    exit 1
  fi
}
if [[ $do_xattn == 1 ]]; then
  emu="${emulator:-$work/xattn_sim_emulate}"
  build_emulator xattn_sim/emulate.cpp "$emu"
  "$emu" --plan 36 32 1024
  "$emu" --plan 64 128 1024
fi
if [[ $do_nm == 1 ]]; then
  nm_emu="${nm_emulator:-$work/node_match_emulate}"
  build_emulator node_match/emulate.cpp "$nm_emu"
  "$nm_emu" --plan 36 32 1024 16
  "$nm_emu" --plan 64 128 1024 16
fi
if [[ $do_ls == 1 ]]; then
  ls_emu="${ls_emulator:-$work/local_sim_emulate}"
  build_emulator local_sim/emulate.cpp "$ls_emu"
  "$ls_emu" --plan 36 32 1024 256
  "$ls_emu" --plan 64 128 1024 1024
fi

# --- 4. torch binding (optional) -----------------------------------------------------------------------------------
if [[ $binding == 1 ]]; then
  PYTHON="${PYTHON:-python}"
  mapfile -t torch_inc < <("$PYTHON" -c 'from torch.utils.cpp_extension import include_paths; print("\n".join(include_paths()))')
  inc_flags=()
  for d in "${torch_inc[@]}"; do inc_flags+=(-I "$d"); done
  # A CPU-only torch ships c10/cuda headers but not the generated cuda_cmake_macros.h.
  extra=()
  [[ -f "${torch_inc[0]}/c10/cuda/impl/cuda_cmake_macros.h" ]] || extra+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
  bindings=()
  [[ $do_xattn == 1 ]] && bindings+=(xattn_sim/cuda.cu)
  [[ $do_nm == 1 ]] && bindings+=(node_match/cuda.cu)
  [[ $do_ls == 1 ]] && bindings+=(local_sim/cuda.cu)
  for file in "${bindings[@]}"; do
    start=$SECONDS
    "$NVCC" -std=c++20 -O2 -gencode arch=compute_80,code=sm_80 --expt-relaxed-constexpr -Xcompiler -fPIC \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ "${extra[@]}" -I "$root/csrc" "${inc_flags[@]}" \
      -c "$root/csrc/$file" -o "$work/${file%%/*}.o" 2> "$work/binding.log" || {
        cat "$work/binding.log" >&2; echo "FAIL nvcc: csrc/$file" >&2; exit 1; }
    echo "nvcc: torch binding $file compiles against $("$PYTHON" -c 'import torch; print(torch.__version__)') headers ($((SECONDS - start))s)"
  done
fi
if [[ $nvcc_compile == 1 ]]; then
  echo "compile check passed"
else
  echo "host checks passed (nvcc compiles skipped)"
fi
