"""What every op shares: constants, the dtype rules, argument validation, backend dispatch, Triton helpers and the
CPU GEMM wrappers. Nothing here is public API; the ops import from these modules directly."""
