// The SwiGLU gate of Llama-style MLPs, silu(gate) * up, forward and backward, for CPUs: one pass
// over the elements each way, where autograd on transformers' MLP runs silu, a multiply and, in
// backward, two multiplies and silu's backward as separate whole-tensor ops.
//
// The forward rounds as transformers does (silu(gate) in the inputs' dtype, then the product); the
// vectorized expf differs from PyTorch's by a few fp32 units in the last place, so about 1e-3 of
// bf16 outputs land one unit away from the PyTorch ops' result. Backward is the gradient of that
// formula, computed in fp32 and rounded once: d up = dh * silu(gate) (the rounded value the forward
// multiplied by), d gate = dh * up * silu'(gate).
//
// Registered as torch.ops.lorakit_cpu.silu_gate_forward / silu_gate_backward.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

namespace {

// Elements per parallel chunk: large enough that handing out a chunk costs nothing in comparison.
constexpr int64_t kGrain = 32768;

template <typename T>
void forward_elements(const T* gate, const T* up, T* out, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float g = static_cast<float>(gate[i]);
      const T silu = static_cast<T>(g / (1.f + std::exp(-g)));  // rounded, as the PyTorch silu returns it
      out[i] = static_cast<T>(static_cast<float>(silu) * static_cast<float>(up[i]));
    }
  });
}

template <typename T>
void backward_elements(const T* grad, const T* gate, const T* up, T* grad_gate, T* grad_up, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float g = static_cast<float>(gate[i]), dh = static_cast<float>(grad[i]);
      const float sigmoid = 1.f / (1.f + std::exp(-g));
      const float silu = static_cast<float>(static_cast<T>(g * sigmoid));
      grad_up[i] = static_cast<T>(dh * silu);
      grad_gate[i] = static_cast<T>(dh * static_cast<float>(up[i]) * sigmoid * (1.f + g * (1.f - sigmoid)));
    }
  });
}

void check(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.device().is_cpu() && up.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type(),
              "gate and up must have the same shape and dtype");
  TORCH_CHECK(gate.scalar_type() == at::kFloat || gate.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
}

at::Tensor silu_gate_forward(const at::Tensor& gate_in, const at::Tensor& up_in) {
  check(gate_in, up_in);
  const at::Tensor gate = gate_in.detach().contiguous(), up = up_in.detach().contiguous();
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gate.scalar_type(), "silu_gate_forward", [&] {
    forward_elements(gate.data_ptr<scalar_t>(), up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), gate.numel());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> silu_gate_backward(const at::Tensor& grad_out, const at::Tensor& gate_in,
                                                      const at::Tensor& up_in) {
  check(gate_in, up_in);
  const at::Tensor gate = gate_in.detach().contiguous(), up = up_in.detach().contiguous();
  const at::Tensor grad = grad_out.detach().to(gate.scalar_type()).contiguous();
  TORCH_CHECK(grad.sizes() == gate.sizes(), "grad_out does not match gate");
  at::Tensor grad_gate = at::empty(gate.sizes(), gate.options());
  at::Tensor grad_up = at::empty(gate.sizes(), gate.options());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gate.scalar_type(), "silu_gate_backward", [&] {
    backward_elements(grad.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(), up.data_ptr<scalar_t>(),
                      grad_gate.data_ptr<scalar_t>(), grad_up.data_ptr<scalar_t>(), gate.numel());
  });
  return {grad_gate, grad_up};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lorakit_cpu, m) {
  m.def("silu_gate_forward(Tensor gate, Tensor up) -> Tensor");
  m.def("silu_gate_backward(Tensor grad_out, Tensor gate, Tensor up) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lorakit_cpu, CPU, m) {
  m.impl("silu_gate_forward", &silu_gate_forward);
  m.impl("silu_gate_backward", &silu_gate_backward);
}
