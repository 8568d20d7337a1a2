// Loads and stores of float32 and bfloat16 elements as float, for the elementwise kernels.
//
// bfloat16 goes through its bits, rounded to nearest even with NaN kept NaN, as c10::BFloat16
// rounds: c10's conversion kept the loops that use it from vectorizing (2.5x slower).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace lorakit_kernels {

inline float load(const float* p) { return *p; }
inline void store(float* p, float v) { *p = v; }

inline float load(const c10::BFloat16* p) {
  const uint32_t u = static_cast<uint32_t>(p->x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline void store(c10::BFloat16* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  p->x = (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0 : static_cast<uint16_t>(rounded);
}

// v rounded to T, as a PyTorch op returning T rounds its fp32 result.
template <typename T>
inline float round_to(float v) {
  T t;
  store(&t, v);
  return load(&t);
}

}  // namespace lorakit_kernels
