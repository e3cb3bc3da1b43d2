// cpu_level.h: which x86-64 level the float32 CPU loops run at, and the
// per-level compilation of those loops.
//
// Each float32 hot loop is compiled three times, for x86-64-v4 (AVX-512),
// x86-64-v3 (AVX2 + FMA) and the baseline ISA, and one copy is chosen once per
// process: the best the CPU supports, or the one named by the environment
// variable FASTVAE_CPU_LEVEL (auto | avx512 | avx2 | baseline). The variable
// lets an AVX-512 machine run and time the AVX2 code other machines use.
// (An explicit choice instead of GCC's target_clones, whose ifunc resolver picks
// by CPU alone and cannot be overridden.)
#pragma once

#include <cstdint>

namespace fastvae {
namespace cpu {

enum class CpuLevel { kBaseline, kAvx2, kAvx512 };

// The level every float32 loop of this process uses. Resolved on the first
// call; throws (a c10::Error naming FASTVAE_CPU_LEVEL) if the variable names an
// unknown level or one this CPU cannot run, and again on every later call.
CpuLevel cpu_level();

// "avx512", "avx2" or "baseline".
const char* cpu_level_name(CpuLevel level);

// The per-level copies exist only where GCC can compile them (x86-64 Linux);
// elsewhere every level runs the same portable code.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTVAE_X86_LEVELS 1
#define FASTVAE_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define FASTVAE_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#else
#define FASTVAE_X86_LEVELS 0
#define FASTVAE_TARGET_AVX512
#define FASTVAE_TARGET_AVX2
#endif

// Kernel{}(args, begin, end), compiled at each level. Kernel's operator() must
// be forced inline (and everything it calls), so that its whole body is
// compiled for the level of the function it lands in.
template <typename Kernel, typename Args>
FASTVAE_TARGET_AVX512 void run_avx512(const Args& args, int64_t begin, int64_t end) {
  Kernel{}(args, begin, end);
}
template <typename Kernel, typename Args>
FASTVAE_TARGET_AVX2 void run_avx2(const Args& args, int64_t begin, int64_t end) {
  Kernel{}(args, begin, end);
}
template <typename Kernel, typename Args>
void run_baseline(const Args& args, int64_t begin, int64_t end) {
  Kernel{}(args, begin, end);
}

// Runs Kernel over [begin, end) with the copy compiled for cpu_level().
template <typename Kernel, typename Args>
void run_at_cpu_level(const Args& args, int64_t begin, int64_t end) {
  switch (cpu_level()) {
    case CpuLevel::kAvx512:
      return run_avx512<Kernel>(args, begin, end);
    case CpuLevel::kAvx2:
      return run_avx2<Kernel>(args, begin, end);
    default:
      return run_baseline<Kernel>(args, begin, end);
  }
}

// Runs Kernel<kBytes>, kBytes the vector register width of cpu_level() (64 at AVX-512,
// 32 at AVX2, 16 at the baseline), over [begin, end): for loops written with GCC
// vectors, which GCC splits through the stack when they are wider than the level's
// registers.
template <template <int> class Kernel, typename Args>
void run_at_register_width(const Args& args, int64_t begin, int64_t end) {
  switch (cpu_level()) {
    case CpuLevel::kAvx512:
      return run_avx512<Kernel<64>>(args, begin, end);
    case CpuLevel::kAvx2:
      return run_avx2<Kernel<32>>(args, begin, end);
    default:
      return run_baseline<Kernel<16>>(args, begin, end);
  }
}

}  // namespace cpu
}  // namespace fastvae
