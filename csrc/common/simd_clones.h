// SIMD code paths of the CPU epilogues: x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA) and baseline, chosen at load
// time (target_clones); -DITM_SIMD_ONLY=0/3/4 builds one path alone for testing.
#pragma once
#if defined(ITM_SIMD_ONLY)  // testing one code path alone: -DITM_SIMD_ONLY=0 (baseline), 3 (x86-64-v3) or 4
#if ITM_SIMD_ONLY == 4
#define ITM_SIMD_CLONES __attribute__((target("arch=x86-64-v4")))
#elif ITM_SIMD_ONLY == 3
#define ITM_SIMD_CLONES __attribute__((target("arch=x86-64-v3")))
#else
#define ITM_SIMD_CLONES
#endif
#elif (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && \
    defined(__linux__)
#define ITM_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define ITM_SIMD_LEVELS_X86 1
#elif (defined(__x86_64__) || defined(_M_X64)) && defined(__clang__) && __clang_major__ >= 14 && defined(__linux__)
#define ITM_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define ITM_SIMD_LEVELS_X86 1
#else
#define ITM_SIMD_CLONES
#endif
