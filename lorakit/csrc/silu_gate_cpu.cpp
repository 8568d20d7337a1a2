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
// silu_gate_backward_ writes the two gradients over gate and up, element by element after reading
// them: for the MLP's own gate and up, which nothing reads after this backward, that saves two
// fresh (T, intermediate) tensors (224 MiB at a 7B model's shape and 4,096 tokens), their page
// faults included.
//
// Registered as torch.ops.lorakit_cpu.silu_gate_forward / silu_gate_backward / silu_gate_backward_.
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

// The gradients of one element, (d gate, d up), from its gate, up and output gradient dh.
template <typename T>
inline void element_gradients(float g, float u, float dh, T* grad_gate, T* grad_up) {
  const float sigmoid = 1.f / (1.f + std::exp(-g));
  const float silu = static_cast<float>(static_cast<T>(g * sigmoid));
  *grad_up = static_cast<T>(dh * silu);
  *grad_gate = static_cast<T>(dh * u * sigmoid * (1.f + g * (1.f - sigmoid)));
}

template <typename T>
void backward_elements(const T* grad, const T* gate, const T* up, T* grad_gate, T* grad_up, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      element_gradients(static_cast<float>(gate[i]), static_cast<float>(up[i]), static_cast<float>(grad[i]),
                        grad_gate + i, grad_up + i);
  });
}

// The same with the gradients written over gate and up: each element's inputs are read before
// its results are stored.
template <typename T>
void backward_elements_in_place(const T* grad, T* gate, T* up, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      element_gradients(static_cast<float>(gate[i]), static_cast<float>(up[i]), static_cast<float>(grad[i]),
                        gate + i, up + i);
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

void silu_gate_backward_(const at::Tensor& grad_out, at::Tensor& gate, at::Tensor& up) {
  check(gate, up);
  TORCH_CHECK(gate.is_contiguous() && up.is_contiguous(), "silu_gate_backward_ writes into gate and up: contiguous only");
  TORCH_CHECK(!gate.is_same(up), "gate and up must be different tensors");
  const at::Tensor grad = grad_out.detach().to(gate.scalar_type()).contiguous();
  TORCH_CHECK(grad.sizes() == gate.sizes(), "grad_out does not match gate");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gate.scalar_type(), "silu_gate_backward_", [&] {
    backward_elements_in_place(grad.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(), up.data_ptr<scalar_t>(),
                               gate.numel());
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lorakit_cpu, m) {
  m.def("silu_gate_forward(Tensor gate, Tensor up) -> Tensor");
  m.def("silu_gate_backward(Tensor grad_out, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("silu_gate_backward_(Tensor grad_out, Tensor(a!) gate, Tensor(b!) up) -> ()");
}

TORCH_LIBRARY_IMPL(lorakit_cpu, CPU, m) {
  m.impl("silu_gate_forward", &silu_gate_forward);
  m.impl("silu_gate_backward", &silu_gate_backward);
  m.impl("silu_gate_backward_", &silu_gate_backward_);
}
