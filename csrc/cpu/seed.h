// seed.h: the one seed a CPU call of the latent op draws from torch's generator.
//
// Shared by the CPU kernel of fastvae::latent_terms_from_generator and the
// extension module's fast eager path (module.cpp), so that both give the same
// noise from the same generator state.
#pragma once

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>
#include <ATen/core/TransformationHelper.h>

#include <mutex>

namespace fastvae {
namespace cpu {

// Exactly what `torch.empty((), dtype=torch.int64).random_(generator=generator)`
// draws (None: torch's default CPU generator), without allocating a tensor or
// going through the dispatcher.
inline int64_t draw_cpu_seed(const c10::optional<at::Generator>& generator) {
  auto* cpu = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(cpu->mutex_);
  return at::transformation::uniform_int<int64_t>(cpu->random64());
}

}  // namespace cpu
}  // namespace fastvae
