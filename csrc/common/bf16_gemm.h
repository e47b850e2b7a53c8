// Which bfloat16 GEMM path this CPU has, probed ONCE per process (the probe lives in csrc/gemm/cpu.cpp) and shared
// by every CPU kernel (xattn_sim, local_sim, sgr_step, brgemm_mm) and build_info().
#pragma once

namespace itm {
namespace cpu {

enum class Bf16Gemm {
  kVnni,        // brgemm multiplies bfloat16 with B in the VNNI layout of common/vnni.h (AVX-512-BF16 ukernel)
  kOneDnnPack,  // brgemm multiplies bfloat16 with B packed by oneDNN's own cpublas::pack (AMX machines)
  kPlain,       // neither: bfloat16 runs as float32 products of the (exactly widened) values
};

Bf16Gemm bf16_gemm_kind();
const char* bf16_gemm_path();  // "brgemm-vnni", "brgemm-onednn-pack" or "gemm-fp32-accumulate"
bool bf16_brgemm();            // bf16_gemm_kind() != kPlain

}  // namespace cpu
}  // namespace itm
