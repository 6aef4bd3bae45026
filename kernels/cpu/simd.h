// Shared by the CPU kernels: build the hot loops twice, for AVX2 and for the baseline ISA, and pick at load
// time (GCC/Clang function multiversioning), so that one binary is fast on this machine and runs anywhere.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MOEFORGE_KERNEL_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MOEFORGE_KERNEL_CLONES
#endif
