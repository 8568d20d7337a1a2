// Causal attention over the examples of packed rows, forward and backward, for CPUs.
//
// The algorithm of lorakit.attention._BlockedCausalAttention (blocks of query rows, the softmax
// row whole, the probabilities kept for backward) with the block loop and its elementwise work in
// C++. In Python each 64-row block costs ~20 small tensor ops and their allocations, about 40% of
// that kernel's time on the benchmark model. Here the work is one task per (example, key head),
// handed out to the intra-op threads; inside a task the GEMMs run single-threaded into buffers the
// task owns, and gathers, softmax and gradient rows are plain loops.
//
// Registered as torch.ops.lorakit_cpu.attention_forward / attention_backward and loaded by
// lorakit/cpu_kernels.py, which keeps the Python kernel when no compiler is available.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

namespace {

struct Task {
  int64_t row, start, length, kv_head, prob_offset, block_rows;
};

// One task per (example, key head). Each owns a slice of the flat probability buffer, in which its
// blocks lie one after another as (query heads of the group x block rows, keys up to block end).
std::vector<Task> make_tasks(at::IntArrayRef segments, int64_t batch, int64_t tokens, int64_t kv_heads,
                             int64_t per_group, int64_t block_rows, int64_t* total) {
  TORCH_CHECK(segments.size() % 3 == 0, "segments must be (row, start, end) triples");
  TORCH_CHECK(block_rows > 0, "block_rows must be positive");
  std::vector<Task> tasks;
  int64_t offset = 0;
  for (size_t i = 0; i < segments.size(); i += 3) {
    const int64_t row = segments[i], start = segments[i + 1], length = segments[i + 2] - start;
    TORCH_CHECK(row >= 0 && row < batch && start >= 0 && length > 0 && start + length <= tokens,
                "segment (", row, ", ", start, ", ", start + length, ") is empty or outside the (", batch, ", ", tokens,
                ") batch");
    int64_t size = 0;
    for (int64_t r0 = 0; r0 < length; r0 += block_rows) {
      const int64_t r1 = std::min(length, r0 + block_rows);
      size += per_group * (r1 - r0) * r1;
    }
    for (int64_t g = 0; g < kv_heads; ++g) {
      tasks.push_back({row, start, length, g, offset, block_rows});
      offset += size;
    }
  }
  *total = offset;
  return tasks;
}

// Runs fn(task) for every task, handed out one at a time to the intra-op threads, longest first,
// so that examples of different lengths balance across threads.
template <typename Fn>
void for_each_task(const std::vector<Task>& tasks, const Fn& fn) {
  std::vector<int64_t> order(tasks.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return tasks[a].length > tasks[b].length; });
  std::atomic<int64_t> next{0};
  const int64_t n = static_cast<int64_t>(order.size());
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    // Below autograd: the worker threads do not inherit the caller's no-grad mode, and the buffers
    // and views a task makes are never differentiated.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i = next++; i < n; i = next++) fn(tasks[order[i]]);
  });
}

// A (B, X, Y, D) tensor with unit stride in D, addressed by (b, x, y).
template <typename T>
struct Rows {
  T* data;
  int64_t sb, sx, sy;
  explicit Rows(const at::Tensor& t) : data(static_cast<T*>(t.data_ptr())), sb(t.stride(0)), sx(t.stride(1)), sy(t.stride(2)) {}
  T* at(int64_t b, int64_t x, int64_t y) const { return data + b * sb + x * sx + y * sy; }
};

// Copies positions pos..pos+rows of heads h0..h0+heads of row b of a (B, H, T, D) tensor into a
// (heads x rows, D) block, converted to U and multiplied by `factor`.
template <typename T, typename U>
void gather_heads(const Rows<const T>& src, int64_t b, int64_t h0, int64_t heads, int64_t pos, int64_t rows,
                  int64_t d, float factor, U* dst) {
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < rows; ++i) {
      const T* s = src.at(b, h0 + h, pos + i);
      U* o = dst + (h * rows + i) * d;
      for (int64_t j = 0; j < d; ++j) o[j] = static_cast<U>(static_cast<float>(s[j]) * factor);
    }
}

// Same from a (B, T, H, D) tensor (outputs and their gradients).
template <typename T, typename U>
void gather_tokens(const Rows<const T>& src, int64_t b, int64_t h0, int64_t heads, int64_t pos, int64_t rows,
                   int64_t d, U* dst) {
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < rows; ++i) {
      const T* s = src.at(b, pos + i, h0 + h);
      U* o = dst + (h * rows + i) * d;
      for (int64_t j = 0; j < d; ++j) o[j] = static_cast<U>(s[j]);
    }
}

// The inverse of gather_tokens, scaled: a (heads x rows, D) block into a (B, T, H, D) tensor.
template <typename T>
void scatter_tokens(const T* src, int64_t heads, int64_t rows, int64_t d, float factor, const Rows<T>& dst, int64_t b,
                    int64_t h0, int64_t pos) {
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < rows; ++i) {
      const T* s = src + (h * rows + i) * d;
      T* o = dst.at(b, pos + i, h0 + h);
      for (int64_t j = 0; j < d; ++j) o[j] = static_cast<T>(static_cast<float>(s[j]) * factor);
    }
}

template <typename T>
void accumulate(float* acc, const T* add, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<float>(add[i]);
}

// out = a @ b, into memory the caller owns (at::mm_out takes its output by non-const reference)
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

template <typename T>
at::Tensor view(T* data, at::IntArrayRef shape, const at::TensorOptions& options) {
  return at::from_blob(data, shape, options);
}

template <typename scalar_t>
void forward_task(const Task& t, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                  const at::Tensor& probs, float scale, int64_t per_group, bool write_out) {
  const auto opts = q.options();
  const auto fp32 = opts.dtype(at::kFloat);
  const int64_t d = q.size(3), h0 = t.kv_head * per_group, block = per_group * t.block_rows;
  // (L, D) keys in fp32 for the score GEMM, as flash kernels accumulate scores in fp32
  at::Tensor keys = k.select(0, t.row).select(0, t.kv_head).narrow(0, t.start, t.length).to(at::kFloat);
  at::Tensor values = v.select(0, t.row).select(0, t.kv_head).narrow(0, t.start, t.length);
  at::Tensor qbuf = at::empty({block, d}, fp32);
  at::Tensor sbuf = at::empty({block * t.length}, fp32);
  at::Tensor obuf = at::empty({block, d}, opts);
  const Rows<const scalar_t> qrows(q);
  const Rows<scalar_t> orows(out);
  scalar_t* p = probs.data_ptr<scalar_t>() + t.prob_offset;
  for (int64_t r0 = 0; r0 < t.length; r0 += t.block_rows) {
    const int64_t r1 = std::min(t.length, r0 + t.block_rows), rows = r1 - r0, n = per_group * rows;
    gather_heads(qrows, t.row, h0, per_group, t.start + r0, rows, d, scale, qbuf.data_ptr<float>());
    float* s = sbuf.data_ptr<float>();
    mm_into(view(s, {n, r1}, fp32), qbuf.narrow(0, 0, n), keys.narrow(0, 0, r1).t());
    // causal softmax per row: row i of the block (position r0 + i) sees keys 0..r0+i
    for (int64_t h = 0; h < per_group; ++h)
      for (int64_t i = 0; i < rows; ++i) {
        float* sr = s + (h * rows + i) * r1;
        scalar_t* pr = p + (h * rows + i) * r1;
        const int64_t valid = r0 + i + 1;
        float peak = sr[0];
        for (int64_t j = 1; j < valid; ++j) peak = std::max(peak, sr[j]);
        float total = 0.f;
        for (int64_t j = 0; j < valid; ++j) {
          sr[j] = std::exp(sr[j] - peak);
          total += sr[j];
        }
        const float inv = 1.f / total;
        for (int64_t j = 0; j < valid; ++j) pr[j] = static_cast<scalar_t>(sr[j] * inv);
        for (int64_t j = valid; j < r1; ++j) pr[j] = static_cast<scalar_t>(0.f);
      }
    if (write_out) {
      mm_into(obuf.narrow(0, 0, n), view(p, {n, r1}, opts), values.narrow(0, 0, r1));
      scatter_tokens(obuf.data_ptr<scalar_t>(), per_group, rows, d, 1.f, orows, t.row, h0, t.start + r0);
    }
    p += n * r1;
  }
}

template <typename scalar_t>
void backward_task(const Task& t, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& probs, const at::Tensor& grad_q,
                   const at::Tensor& grad_k, const at::Tensor& grad_v, float scale, int64_t per_group) {
  const auto opts = q.options();
  const auto fp32 = opts.dtype(at::kFloat);
  const int64_t d = q.size(3), h0 = t.kv_head * per_group, block = per_group * t.block_rows, length = t.length;
  at::Tensor keys = k.select(0, t.row).select(0, t.kv_head).narrow(0, t.start, length);
  at::Tensor values = v.select(0, t.row).select(0, t.kv_head).narrow(0, t.start, length);
  const Rows<const scalar_t> qrows(q), grows(grad_out), orows(out);
  // rowsum(P ∘ dP) = rowsum(dO ∘ O): one number per (head, row) of the example
  std::vector<float> delta(per_group * length);
  for (int64_t h = 0; h < per_group; ++h)
    for (int64_t i = 0; i < length; ++i) {
      const scalar_t* g = grows.at(t.row, t.start + i, h0 + h);
      const scalar_t* o = orows.at(t.row, t.start + i, h0 + h);
      float sum = 0.f;
      for (int64_t j = 0; j < d; ++j) sum += static_cast<float>(g[j]) * static_cast<float>(o[j]);
      delta[h * length + i] = sum;
    }
  std::vector<float> grad_keys(length * d, 0.f), grad_values(length * d, 0.f);
  at::Tensor gbuf = at::empty({block, d}, opts);       // dO of the block
  at::Tensor qbuf = at::empty({block, d}, opts);       // Q of the block
  at::Tensor dbuf = at::empty({block, d}, opts);       // dQ of the block
  at::Tensor kvbuf = at::empty({length, d}, opts);     // a block's dK or dV term before accumulation
  at::Tensor sbuf = at::empty({block * length}, opts); // dP, then dS in place
  const Rows<scalar_t> dqrows(grad_q);
  const scalar_t* p = probs.data_ptr<scalar_t>() + t.prob_offset;
  for (int64_t r0 = 0; r0 < length; r0 += t.block_rows) {
    const int64_t r1 = std::min(length, r0 + t.block_rows), rows = r1 - r0, n = per_group * rows;
    at::Tensor gb = gbuf.narrow(0, 0, n), qb = qbuf.narrow(0, 0, n), kv = kvbuf.narrow(0, 0, r1);
    at::Tensor pb = view(const_cast<scalar_t*>(p), {n, r1}, opts);
    gather_tokens(grows, t.row, h0, per_group, t.start + r0, rows, d, gbuf.data_ptr<scalar_t>());
    mm_into(kv, pb.t(), gb);
    accumulate(grad_values.data(), kvbuf.data_ptr<scalar_t>(), r1 * d);
    scalar_t* ds = sbuf.data_ptr<scalar_t>();
    mm_into(view(ds, {n, r1}, opts), gb, values.narrow(0, 0, r1).t());
    for (int64_t h = 0; h < per_group; ++h)
      for (int64_t i = 0; i < rows; ++i) {
        const float dl = delta[h * length + r0 + i];
        const int64_t base = (h * rows + i) * r1, valid = r0 + i + 1;
        for (int64_t j = 0; j < valid; ++j)
          ds[base + j] = static_cast<scalar_t>(static_cast<float>(p[base + j]) * (static_cast<float>(ds[base + j]) - dl));
        for (int64_t j = valid; j < r1; ++j) ds[base + j] = static_cast<scalar_t>(0.f);
      }
    at::Tensor dsb = view(ds, {n, r1}, opts);
    mm_into(dbuf.narrow(0, 0, n), dsb, keys.narrow(0, 0, r1));
    scatter_tokens(dbuf.data_ptr<scalar_t>(), per_group, rows, d, scale, dqrows, t.row, h0, t.start + r0);
    gather_heads(qrows, t.row, h0, per_group, t.start + r0, rows, d, 1.f, qbuf.data_ptr<scalar_t>());
    mm_into(kv, dsb.t(), qb);
    accumulate(grad_keys.data(), kvbuf.data_ptr<scalar_t>(), r1 * d);
    p += n * r1;
  }
  const Rows<scalar_t> dkrows(grad_k), dvrows(grad_v);
  for (int64_t i = 0; i < length; ++i) {
    scalar_t* dk = dkrows.at(t.row, t.kv_head, t.start + i);
    scalar_t* dv = dvrows.at(t.row, t.kv_head, t.start + i);
    for (int64_t j = 0; j < d; ++j) {
      dk[j] = static_cast<scalar_t>(grad_keys[i * d + j] * scale);
      dv[j] = static_cast<scalar_t>(grad_values[i * d + j]);
    }
  }
}

// (B, T, H, D): the layout of the output and of the query's gradient, for a (B, H, T, D) query
std::vector<int64_t> token_major(const at::Tensor& q) { return {q.size(0), q.size(2), q.size(1), q.size(3)}; }

// The kernels read the innermost dimension with unit stride; detached, as they are not differentiated.
at::Tensor unit_stride(const at::Tensor& x) { return (x.stride(-1) == 1 ? x : x.contiguous()).detach(); }

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "query/key/value must be (B, H, T, D)");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "query, key and value dtypes differ");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "query heads must be a multiple of key heads");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3),
              "key/value shapes do not match the query");
}

// query (B, H, T, D), key/value (B, H_kv, T, D), segments (row, start, end) triples covering the
// examples, block_rows query rows per block; returns the output (B, T, H, D) and the flat
// probability buffer. With `kept_out` (a
// selective-checkpointing rerun, whose output was kept) only the probabilities are computed.
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                                     at::IntArrayRef segments, double scale, int64_t block_rows,
                                                     const std::optional<at::Tensor>& kept_out) {
  check_inputs(query, key, value);
  const at::Tensor q = unit_stride(query), k = unit_stride(key), v = unit_stride(value);
  const int64_t kv_heads = k.size(1), per_group = q.size(1) / kv_heads;
  int64_t total = 0;
  const auto tasks = make_tasks(segments, q.size(0), q.size(2), kv_heads, per_group, block_rows, &total);
  at::Tensor probs = at::empty({total}, q.options());
  const bool write_out = !kept_out.has_value();
  at::Tensor out = write_out ? at::zeros(token_major(q), q.options()) : *kept_out;
  TORCH_CHECK(out.sizes() == at::IntArrayRef(token_major(q)) && out.scalar_type() == q.scalar_type() && out.stride(-1) == 1,
              "the kept output must be (B, T, H, D) in the query's dtype with unit stride in D");
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "attention_forward", [&] {
    for_each_task(tasks, [&](const Task& t) {
      forward_task<scalar_t>(t, q, k, v, out, probs, static_cast<float>(scale), per_group, write_out);
    });
  });
  return {out, probs};
}

// Gradients of attention_forward: grad_out (B, T, H, D) -> dQ (B, T, H, D), dK, dV (B, H_kv, T, D).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& grad_out, const at::Tensor& query,
                                                                  const at::Tensor& key, const at::Tensor& value,
                                                                  const at::Tensor& out, const at::Tensor& probs,
                                                                  at::IntArrayRef segments, double scale,
                                                                  int64_t block_rows) {
  check_inputs(query, key, value);
  const at::Tensor q = unit_stride(query), k = unit_stride(key), v = unit_stride(value);
  const at::Tensor g = unit_stride(grad_out.to(q.scalar_type())), o = unit_stride(out.to(q.scalar_type()));
  TORCH_CHECK(g.sizes() == at::IntArrayRef(token_major(q)) && o.sizes() == g.sizes(),
              "the output and its gradient must be (B, T, H, D)");
  const int64_t kv_heads = k.size(1), per_group = q.size(1) / kv_heads;
  int64_t total = 0;
  const auto tasks = make_tasks(segments, q.size(0), q.size(2), kv_heads, per_group, block_rows, &total);
  TORCH_CHECK(probs.numel() == total, "the probability buffer does not match the segments");
  at::Tensor grad_q = at::zeros(token_major(q), q.options());
  at::Tensor grad_k = at::zeros(k.sizes(), k.options());
  at::Tensor grad_v = at::zeros(v.sizes(), v.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "attention_backward", [&] {
    for_each_task(tasks, [&](const Task& t) {
      backward_task<scalar_t>(t, g, q, k, v, o, probs, grad_q, grad_k, grad_v, static_cast<float>(scale), per_group);
    });
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY(lorakit_cpu, m) {
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, int[] segments, float scale, int block_rows, Tensor? kept_out) "
      "-> (Tensor, Tensor)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor probs, int[] segments, "
      "float scale, int block_rows) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lorakit_cpu, CPU, m) {
  m.impl("attention_forward", &attention_forward);
  m.impl("attention_backward", &attention_backward);
}
