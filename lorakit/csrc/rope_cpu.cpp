// Rotary position embeddings (RoPE) of Llama-style models, forward and backward, for CPUs: one
// pass over the query or key tensor, where transformers' `apply_rotary_pos_emb` runs a slice, a
// negation, a concatenation, two multiplies and an add per tensor, and autograd's backward of it
// two multiplies, two zero-filled slice gradients and their sums.
//
// The formula is transformers': out = x * cos + rotate_half(x) * sin with
// rotate_half(x) = (-x[h:], x[:h]) over the last dimension (h = D / 2), every product and the sum
// rounded to x's dtype as those ops round them, so the output equals theirs bit for bit. Backward
// is the transpose: grad_x = g * cos + rotate_half^T(g * sin) with rotate_half^T(y) = (y[h:], -y[:h]),
// rounded as autograd rounds it (each product, then their sum). Contraction of a multiply and an
// add into one fused multiply-add is off here, so float32 rounds as PyTorch's separate ops do too.
//
// x: (B, H, T, D) with any strides but a contiguous last dimension (the projections' output seen
// through `.view(B, T, H, D).transpose(1, 2)`); cos, sin: (B or 1, T, D), last dimension contiguous.
// The output has x's sizes and strides.
//
// Registered as torch.ops.lorakit_cpu.rope(x, cos, sin, backward).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

#include "float_bits.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace {

using lorakit_kernels::load;
using lorakit_kernels::round_to;
using lorakit_kernels::store;

// Rows of D elements per parallel chunk.
constexpr int64_t kGrainRows = 256;

struct Strides {
  int64_t b, h, t;
};

// One row of D elements. Forward: out[j] = x[j]c[j] - x[j+h]s[j], out[j+h] = x[j+h]c[j+h] + x[j]s[j+h].
// Backward: out[j] = x[j]c[j] + x[j+h]s[j+h], out[j+h] = x[j+h]c[j+h] - x[j]s[j].
// The pointers come in by value so that the compiler knows the stores do not alias the loads.
template <typename T>
void rotate_row(const T* __restrict x, const T* __restrict c, const T* __restrict s, T* __restrict out, int64_t half,
                bool backward) {
  const T* s_lo = backward ? s + half : s;  // the sine the partner of a first-half element meets
  const T* s_hi = backward ? s : s + half;
  const float sign = backward ? 1.f : -1.f;  // of the partner's term in the first half
  for (int64_t j = 0; j < half; ++j) {
    const float lo = load(x + j), hi = load(x + half + j);
    const float lo_cos = round_to<T>(lo * load(c + j)), hi_cos = round_to<T>(hi * load(c + half + j));
    const float hi_sin = round_to<T>(hi * load(s_lo + j)), lo_sin = round_to<T>(lo * load(s_hi + j));
    store(out + j, lo_cos + sign * hi_sin);
    store(out + half + j, hi_cos - sign * lo_sin);
  }
}

template <typename T>
void rotate(const T* x, const T* cos, const T* sin, T* out, int64_t heads, int64_t tokens, int64_t dim, int64_t rows,
            Strides sx, Strides sc, Strides so, bool backward) {
  at::parallel_for(0, rows, kGrainRows, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r % tokens, h = (r / tokens) % heads, b = r / (tokens * heads);
      const int64_t rc = b * sc.b + t * sc.t;
      rotate_row(x + b * sx.b + h * sx.h + t * sx.t, cos + rc, sin + rc, out + b * so.b + h * so.h + t * so.t,
                 dim / 2, backward);
    }
  });
}

at::Tensor rope(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in, bool backward) {
  TORCH_CHECK(x_in.device().is_cpu() && cos_in.device().is_cpu() && sin_in.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
  TORCH_CHECK(cos_in.scalar_type() == x_in.scalar_type() && sin_in.scalar_type() == x_in.scalar_type(),
              "cos and sin must have x's dtype");
  TORCH_CHECK(x_in.dim() == 4, "x must be (batch, heads, tokens, head_dim)");
  TORCH_CHECK(cos_in.dim() == 3 && cos_in.sizes() == sin_in.sizes(), "cos and sin must be (batch, tokens, head_dim)");
  const int64_t batch = x_in.size(0), heads = x_in.size(1), tokens = x_in.size(2), dim = x_in.size(3);
  TORCH_CHECK(dim % 2 == 0, "head_dim must be even, got ", dim);
  TORCH_CHECK((cos_in.size(0) == batch || cos_in.size(0) == 1) && cos_in.size(1) == tokens && cos_in.size(2) == dim,
              "cos and sin must be (batch or 1, tokens, head_dim) for x of shape ", x_in.sizes());
  const at::Tensor x = x_in.stride(3) == 1 ? x_in.detach() : x_in.detach().contiguous();
  const at::Tensor cos = cos_in.detach().contiguous(), sin = sin_in.detach().contiguous();
  // x's layout when it is dense (the usual transposed view), else a contiguous one
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Preserve);
  if (out.stride(3) != 1) out = at::empty(x.sizes(), x.options());
  const Strides sx{x.stride(0), x.stride(1), x.stride(2)}, so{out.stride(0), out.stride(1), out.stride(2)};
  const Strides sc{cos.size(0) == 1 ? 0 : cos.stride(0), 0, cos.stride(1)};
  const int64_t rows = batch * heads * tokens;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (rows == 0 || dim == 0) return out;
  if (x.scalar_type() == at::kFloat) {
    rotate(x.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), out.data_ptr<float>(), heads, tokens,
           dim, rows, sx, sc, so, backward);
  } else {
    rotate(x.data_ptr<c10::BFloat16>(), cos.data_ptr<c10::BFloat16>(), sin.data_ptr<c10::BFloat16>(),
           out.data_ptr<c10::BFloat16>(), heads, tokens, dim, rows, sx, sc, so, backward);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lorakit_cpu, m) {
  m.def("rope(Tensor x, Tensor cos, Tensor sin, bool backward) -> Tensor");
}

TORCH_LIBRARY_IMPL(lorakit_cpu, CPU, m) {
  m.impl("rope", &rope);
}
