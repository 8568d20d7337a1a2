// Llama-style RMSNorm, forward and backward, for CPUs: one pass over each row where the PyTorch
// version (lorakit.fused._RmsNorm) runs an fp32 copy, a square, a mean, a scale, a cast and a
// weight multiply as separate whole-tensor ops, each a trip through memory.
//
// The formula is lorakit.fused.rms_norm's: normalise in fp32, round to x's dtype, then multiply by
// the weight in the weight's dtype (promoted as torch promotes `weight * normed`). Backward is that
// function's backward: the gradient of x through the fp32 normalisation, the weight's gradient
// from the rounded normalised values.
//
// Registered as torch.ops.lorakit_cpu.rms_norm_forward / rms_norm_backward.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace {

// Rows per parallel chunk: a few hundred KB of work, enough to amortise handing it out.
constexpr int64_t kGrainRows = 16;

template <typename T>
float to_float(T v) {
  return static_cast<float>(v);
}

// x (N, H), weight (H); returns the output (N, H) in `out_type` and rstd (N) in fp32.
template <typename x_t, typename w_t, typename out_t>
void forward_rows(const x_t* x, const w_t* weight, out_t* out, float* rstd, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const x_t* xr = x + r * n;
      out_t* o = out + r * n;
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) sum += to_float(xr[j]) * to_float(xr[j]);
      const float s = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
      rstd[r] = s;
      for (int64_t j = 0; j < n; ++j) {
        const x_t normed = static_cast<x_t>(to_float(xr[j]) * s);  // rounded to x's dtype, as the module does
        o[j] = static_cast<out_t>(to_float(normed) * to_float(weight[j]));
      }
    }
  });
}

template <typename x_t, typename w_t, typename g_t>
void backward_rows(const g_t* grad, const x_t* x, const w_t* weight, const float* rstd, x_t* grad_x, float* grad_w,
                   int64_t rows, int64_t n) {
  // grad_w: one row of partial sums per chunk of kGrainRows rows, summed by the caller. The loop runs
  // over chunk indices, so each chunk (and its row of sums) belongs to exactly one thread.
  const int64_t chunks = (rows + kGrainRows - 1) / kGrainRows;
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      float* gw = grad_w == nullptr ? nullptr : grad_w + c * n;
      for (int64_t r = c * kGrainRows; r < std::min(rows, (c + 1) * kGrainRows); ++r) {
        const g_t* g = grad + r * n;
        const x_t* xr = x + r * n;
        x_t* gx = grad_x + r * n;
        const float s = rstd[r];
        // d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed)), with g the weighted gradient
        float dot = 0.f;
        for (int64_t j = 0; j < n; ++j) dot += to_float(g[j]) * to_float(weight[j]) * (to_float(xr[j]) * s);
        dot /= static_cast<float>(n);
        for (int64_t j = 0; j < n; ++j) {
          const float normed = to_float(xr[j]) * s;
          gx[j] = static_cast<x_t>((to_float(g[j]) * to_float(weight[j]) - normed * dot) * s);
        }
        if (gw != nullptr)
          for (int64_t j = 0; j < n; ++j) gw[j] += to_float(g[j]) * to_float(static_cast<x_t>(to_float(xr[j]) * s));
      }
    }
  });
}

void check(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(weight.dim() == 1 && x.size(-1) == weight.size(0), "weight must be (H) for x (..., H)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "weight must be float32 or bfloat16");
}

// Calls fn(x_data, weight_data) with pointers of the tensors' element types (float32 or bfloat16).
template <typename Fn>
void with_typed_data(const at::Tensor& x, const at::Tensor& weight, const Fn& fn) {
  auto data = [](const at::Tensor& t, auto tag) { return static_cast<const decltype(tag)*>(t.data_ptr()); };
  const bool x_bf16 = x.scalar_type() == at::kBFloat16, w_bf16 = weight.scalar_type() == at::kBFloat16;
  if (x_bf16 && w_bf16) fn(data(x, at::BFloat16()), data(weight, at::BFloat16()));
  else if (x_bf16) fn(data(x, at::BFloat16()), data(weight, float()));
  else if (w_bf16) fn(data(x, float()), data(weight, at::BFloat16()));
  else fn(data(x, float()), data(weight, float()));
}

template <typename P>
using element_t = std::remove_const_t<std::remove_pointer_t<P>>;

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& input, const at::Tensor& weight_in, double eps) {
  check(input, weight_in);
  const at::Tensor x = input.detach().contiguous(), weight = weight_in.detach().contiguous();
  const int64_t n = x.size(-1), rows = n == 0 ? 0 : x.numel() / n;
  const at::ScalarType out_type = at::promote_types(x.scalar_type(), weight.scalar_type());
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(out_type));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  with_typed_data(x, weight, [&](const auto* xp, const auto* wp) {
    using x_t = element_t<decltype(xp)>;
    if (out_type == x.scalar_type())
      forward_rows(xp, wp, static_cast<x_t*>(out.data_ptr()), rstd.data_ptr<float>(), rows, n, static_cast<float>(eps));
    else
      forward_rows(xp, wp, out.data_ptr<float>(), rstd.data_ptr<float>(), rows, n, static_cast<float>(eps));
  });
  return {out, rstd};
}

std::tuple<at::Tensor, std::optional<at::Tensor>> rms_norm_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                                                      const at::Tensor& weight_in, const at::Tensor& rstd,
                                                                      bool weight_grad) {
  check(input, weight_in);
  const at::Tensor x = input.detach().contiguous(), weight = weight_in.detach().contiguous();
  const at::Tensor g = grad_out.detach().to(at::promote_types(x.scalar_type(), weight.scalar_type())).contiguous();
  const int64_t n = x.size(-1), rows = n == 0 ? 0 : x.numel() / n;
  TORCH_CHECK(rstd.numel() == rows && rstd.scalar_type() == at::kFloat, "rstd does not match x");
  TORCH_CHECK(g.sizes() == x.sizes(), "grad_out does not match x");
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  const int64_t chunks = (rows + kGrainRows - 1) / kGrainRows;
  at::Tensor partial = weight_grad ? at::zeros({chunks, n}, x.options().dtype(at::kFloat)) : at::Tensor();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  with_typed_data(x, weight, [&](const auto* xp, const auto* wp) {
    using x_t = element_t<decltype(xp)>;
    float* gw = weight_grad ? partial.data_ptr<float>() : nullptr;
    if (g.scalar_type() == x.scalar_type())
      backward_rows(static_cast<const x_t*>(g.data_ptr()), xp, wp, rstd.data_ptr<float>(), static_cast<x_t*>(grad_x.data_ptr()),
                    gw, rows, n);
    else
      backward_rows(g.data_ptr<float>(), xp, wp, rstd.data_ptr<float>(), static_cast<x_t*>(grad_x.data_ptr()), gw, rows, n);
  });
  std::optional<at::Tensor> grad_weight;
  if (weight_grad) grad_weight = partial.sum(0).to(weight.scalar_type());
  return {grad_x, grad_weight};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lorakit_cpu, m) {
  m.def("rms_norm_forward(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor rstd, bool weight_grad) -> (Tensor, Tensor?)");
}

TORCH_LIBRARY_IMPL(lorakit_cpu, CPU, m) {
  m.impl("rms_norm_forward", &rms_norm_forward);
  m.impl("rms_norm_backward", &rms_norm_backward);
}
