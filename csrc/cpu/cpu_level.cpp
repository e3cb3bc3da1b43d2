// Resolves the CPU level (cpu_level.h) once per process.
#include "cpu_level.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace fastvae {
namespace cpu {
namespace {

CpuLevel best_supported_level() {
#if FASTVAE_X86_LEVELS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return CpuLevel::kAvx512;
  if (__builtin_cpu_supports("x86-64-v3")) return CpuLevel::kAvx2;
#endif
  return CpuLevel::kBaseline;
}

CpuLevel resolve_cpu_level() {
  const CpuLevel best = best_supported_level();
  const char* env = std::getenv("FASTVAE_CPU_LEVEL");
  const std::string wanted = env ? env : "";
  if (wanted.empty() || wanted == "auto") return best;
  CpuLevel level;
  if (wanted == "avx512") {
    level = CpuLevel::kAvx512;
  } else if (wanted == "avx2") {
    level = CpuLevel::kAvx2;
  } else if (wanted == "baseline") {
    level = CpuLevel::kBaseline;
  } else {
    TORCH_CHECK(false, "fastvae: FASTVAE_CPU_LEVEL must be auto, avx512, avx2 or baseline, got '", wanted, "'");
  }
  TORCH_CHECK(static_cast<int>(level) <= static_cast<int>(best), "fastvae: FASTVAE_CPU_LEVEL=", wanted,
              " but this CPU (or build) supports at most ", cpu_level_name(best));
  return level;
}

}  // namespace

CpuLevel cpu_level() {
  static const CpuLevel level = resolve_cpu_level();
  return level;
}

const char* cpu_level_name(CpuLevel level) {
  switch (level) {
    case CpuLevel::kAvx512:
      return "avx512";
    case CpuLevel::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

}  // namespace cpu
}  // namespace fastvae
