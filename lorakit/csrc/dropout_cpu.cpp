// LoRA dropout for CPUs: the keep-mask comes from a counter-based generator, so it is a pure
// function of (seed, element index). Forward and backward compute the same mask from the seed
// alone, and nothing the size of the input is kept for backward. PyTorch's CPU bernoulli draws
// from one Mersenne Twister stream, a single-threaded ~5 ns per element: about 11 ms for a
// (1024, 2048) mask, and 0.34 s of a 1.17 s step over the LoRA layers of lorakit's benchmark model
// (docs/benchmarks.md).
//
// The generator is SplitMix64 (Steele, Lea and Flood 2014): output j is the finalizer applied to
// seed + (j + 1) * golden gamma, a sequence that passes BigCrush. Element i uses the low 32 bits
// of output i / 2 when i is even and the high 32 bits when it is odd; it is kept when those bits
// are below round_down(keep * 2^32). The result is independent of the thread count.
//
// Registered as torch.ops.lorakit_cpu.dropout_mask_mul(x, seed, keep, scale): x * scale where an
// element is kept, in x's dtype (computed in fp32 and rounded once, as PyTorch's `x * mask * scale`
// rounds it), and 0 where it is dropped, also for a NaN (which the base layer's output carries on).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "float_bits.h"

namespace {

using lorakit_kernels::load;
using lorakit_kernels::store;

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ULL;
// Elements per block: the block's random bits are made in one loop and applied in a second, so the
// compiler vectorizes both (64-bit multiplies, then 32-bit compares and the products).
constexpr int64_t kBlock = 64;
// Blocks per parallel chunk.
constexpr int64_t kGrain = 256;

inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// The random bits of elements [start, start + count), start even: output j covers elements 2j and
// 2j + 1 (low half, high half; on a little-endian machine that is the order of the two halves in
// memory, which memcpy keeps).
inline void block_bits(uint64_t seed, int64_t start, int64_t count, uint32_t* bits) {
  uint64_t outputs[kBlock / 2];
  const int64_t first = start / 2, n = (count + 1) / 2;
  for (int64_t k = 0; k < n; ++k) {
    outputs[k] = splitmix64(seed + static_cast<uint64_t>(first + k + 1) * kGamma);
  }
  std::memcpy(bits, outputs, sizeof(uint64_t) * n);
}

// Elements [begin, end) of x times scale where kept, 0 where dropped; begin a multiple of kBlock.
// The pointers come in by value, not through a lambda's captured references, which the stores
// into out could alias as far as the compiler knows (that kept the loop scalar: 2.6x slower).
template <typename T>
void mask_mul_range(const T* x, T* out, int64_t begin, int64_t end, uint64_t seed, uint32_t threshold, float scale) {
  uint32_t bits[kBlock];
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t count = std::min(kBlock, end - start);
    block_bits(seed, start, count, bits);
    for (int64_t i = 0; i < count; ++i) {
      store(out + start + i, bits[i] < threshold ? load(x + start + i) * scale : 0.f);
    }
  }
}

template <typename T>
void mask_mul(const T* x, T* out, int64_t n, uint64_t seed, uint32_t threshold, float scale) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, kGrain, [=](int64_t begin, int64_t end) {
    mask_mul_range(x, out, begin * kBlock, std::min(end * kBlock, n), seed, threshold, scale);
  });
}

at::Tensor dropout_mask_mul(const at::Tensor& x_in, int64_t seed, double keep, double scale) {
  TORCH_CHECK(x_in.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
  TORCH_CHECK(keep > 0.0 && keep < 1.0, "keep must be in (0, 1), got ", keep);
  const at::Tensor x = x_in.detach().contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  // keep * 2^32 rounded down (below 2^32 since keep < 1): P(32 random bits < threshold) is keep
  // within 2^-32
  const uint32_t threshold = static_cast<uint32_t>(std::floor(keep * 4294967296.0));
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (x.scalar_type() == at::kFloat) {
    mask_mul(x.data_ptr<float>(), out.data_ptr<float>(), x.numel(), static_cast<uint64_t>(seed), threshold,
             static_cast<float>(scale));
  } else {
    mask_mul(x.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), x.numel(), static_cast<uint64_t>(seed),
             threshold, static_cast<float>(scale));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lorakit_cpu, m) {
  m.def("dropout_mask_mul(Tensor x, int seed, float keep, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lorakit_cpu, CPU, m) {
  m.impl("dropout_mask_mul", &dropout_mask_mul);
}
