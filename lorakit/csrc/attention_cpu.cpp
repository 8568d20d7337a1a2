// Causal attention over the examples of packed rows, forward and backward, for CPUs.
//
// The algorithm of lorakit.attention._BlockedCausalAttention (blocks of query rows, the softmax
// row whole, the probabilities kept for backward) with the block loop and its elementwise work in
// C++. In Python each 64-row block costs ~20 small tensor ops and their allocations, about 40% of
// that kernel's time on the benchmark model. Here the work is one task per (example, key head),
// handed out to the intra-op threads; inside a task the GEMMs run single-threaded into buffers the
// task owns, and gathers, softmax and gradient rows are plain loops.
//
// The GEMMs: in bf16 on a CPU with AVX512-BF16, lorakit's own (below: bf16 pairs multiplied and
// summed in fp32 by vdpbf16ps, every result rounded once), 1.5x faster than the same kernel calling
// oneDNN per block and closer to the fp64 result; otherwise (fp32, other CPUs) at::mm per block.
//
// Registered as torch.ops.lorakit_cpu.attention_forward / attention_backward (and
// bf16_gemm_available) and loaded by lorakit/cpu_kernels.py, which keeps the Python kernel when no
// compiler is available.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "bf16_pairs.h"
#include "float_bits.h"
#include "vector_exp.h"

namespace {

// bf16 elements load and store through their bits (float_bits.h): c10's conversion kept the
// gathers, scatters and gradient rows below scalar: about 7% of a backward task's time.
using lorakit_kernels::load;
using lorakit_kernels::store;

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
      for (int64_t j = 0; j < d; ++j) store(o + j, load(s + j) * factor);
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
      for (int64_t j = 0; j < d; ++j) store(o + j, load(s + j));
    }
}

// The inverse of gather_tokens, scaled: a (heads x rows, D) block into a (B, T, H, D) tensor.
template <typename S, typename T>
void scatter_tokens(const S* src, int64_t heads, int64_t rows, int64_t d, float factor, const Rows<T>& dst, int64_t b,
                    int64_t h0, int64_t pos) {
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < rows; ++i) {
      const S* s = src + (h * rows + i) * d;
      T* o = dst.at(b, pos + i, h0 + h);
      for (int64_t j = 0; j < d; ++j) store(o + j, load(s + j) * factor);
    }
}

template <typename T>
void accumulate(float* acc, const T* add, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += load(add + i);
}

// out = a @ b, into memory the caller owns (at::mm_out takes its output by non-const reference)
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

template <typename T>
at::Tensor view(T* data, at::IntArrayRef shape, const at::TensorOptions& options) {
  return at::from_blob(data, shape, options);
}

// The causal softmax of a block's scores s (heads x rows, r1) into probabilities p, row by row: row
// i of the block (position r0 + i) sees keys 0..r0+i, and gets zeros past them. The scores are
// multiplied by `scale` first (1 where they come scaled); scale > 0 keeps the largest the largest.
template <typename T>
void causal_softmax_rows(float* s, T* p, int64_t heads, int64_t rows, int64_t r0, int64_t r1, float scale) {
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < rows; ++i) {
      float* sr = s + (h * rows + i) * r1;
      T* pr = p + (h * rows + i) * r1;
      const int64_t valid = r0 + i + 1;
      float peak = sr[0];
      for (int64_t j = 1; j < valid; ++j) peak = std::max(peak, sr[j]);
      float total = 0.f;
      for (int64_t j = 0; j < valid; ++j) {
        sr[j] = std::exp((sr[j] - peak) * scale);
        total += sr[j];
      }
      const float inv = 1.f / total;
      for (int64_t j = 0; j < valid; ++j) store(pr + j, sr[j] * inv);
      for (int64_t j = valid; j < r1; ++j) store(pr + j, 0.f);
    }
}

// dS = P ∘ (dP - delta) for a block, row by row as causal_softmax_rows lays it out; delta of head h,
// row i at delta[h * delta_stride + i]. dP may be ds itself (computed in place).
template <typename T, typename G>
void softmax_gradient_rows(const T* p, const G* dp, T* ds, const float* delta, int64_t delta_stride, int64_t heads,
                           int64_t rows, int64_t r0, int64_t r1) {
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < rows; ++i) {
      const float dl = delta[h * delta_stride + i];
      const int64_t base = (h * rows + i) * r1, valid = r0 + i + 1;
      for (int64_t j = 0; j < valid; ++j)
        store(ds + base + j, load(p + base + j) * (load(dp + base + j) - dl));
      for (int64_t j = valid; j < r1; ++j) store(ds + base + j, 0.f);
    }
}

// A task's summed dK (times scale) and dV into the (B, H_kv, T, D) gradients; element (position i,
// dim j) of the fp32 sums at [i * pos_stride + j * dim_stride].
template <typename T>
void write_key_value_gradients(const Task& t, const float* grad_keys, const float* grad_values, int64_t pos_stride,
                               int64_t dim_stride, int64_t d, float scale, const at::Tensor& grad_k,
                               const at::Tensor& grad_v) {
  const Rows<T> dkrows(grad_k), dvrows(grad_v);
  for (int64_t i = 0; i < t.length; ++i) {
    T* dk = dkrows.at(t.row, t.kv_head, t.start + i);
    T* dv = dvrows.at(t.row, t.kv_head, t.start + i);
    for (int64_t j = 0; j < d; ++j) {
      store(dk + j, grad_keys[i * pos_stride + j * dim_stride] * scale);
      store(dv + j, grad_values[i * pos_stride + j * dim_stride]);
    }
  }
}

#ifdef LORAKIT_BF16_GEMM
using lorakit_kernels::broadcast_half_word;
using lorakit_kernels::broadcast_word;
using lorakit_kernels::dot_pairs;
using lorakit_kernels::first;
using lorakit_kernels::pack_column_pairs;
using lorakit_kernels::pack_row_pairs;
using lorakit_kernels::round_up16;
using lorakit_kernels::store_bf16;

// ---------------------------------------------------------------------------------------------
// bf16 GEMMs with fp32 sums on AVX512-BF16, for the bf16 kernels below.
//
// Called through oneDNN, each of the block's small GEMMs costs a fixed ~15 us, runs at ~110 GFLOP/s
// on one thread, and rounds its output to bf16; the fp32 score GEMM runs at ~86. Here they are
// built on vdpbf16ps (bf16_pairs.h): A as 32-bit words of two consecutive reduction elements,
// broadcast one at a time; B packed as rows of such words, 16 output columns per vector.

// A: word (m, p) -- elements 2p and 2p+1 of the reduction for output row m -- starts at element
// m * row + p * pair. `tail`: the reduction has one element more, data[m * row + 2 * pairs], paired
// with zero (row-major A of odd width; packed operands are padded instead).
struct PairsA {
  const at::BFloat16* data;
  int64_t row, pair;
};

// B: word (p, n) at data[p * ld + n], ld a multiple of 16 and zero from the last column to ld.
struct PairsB {
  const uint32_t* data;
  int64_t ld;
};

using lorakit_kernels::exp_nonpositive;

// causal_softmax_rows for bf16 probabilities, 16 keys per step: about 8% of a forward task's time
// off the version the compiler vectorizes (which calls glibc's vector expf and converts one
// element at a time).
void causal_softmax_rows_bf16(float* s, at::BFloat16* p, int64_t heads, int64_t rows, int64_t r0, int64_t r1,
                              float scale) {
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < rows; ++i) {
      float* sr = s + (h * rows + i) * r1;
      at::BFloat16* pr = p + (h * rows + i) * r1;
      const int64_t valid = r0 + i + 1;
      __m512 peak = lowest;
      for (int64_t j = 0; j < valid; j += 16) peak = _mm512_max_ps(peak, _mm512_mask_loadu_ps(lowest, first(valid - j), sr + j));
      const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(peak)), factor = _mm512_set1_ps(scale);
      __m512 total = _mm512_setzero_ps();
      for (int64_t j = 0; j < valid; j += 16) {
        const __mmask16 m = first(valid - j);
        const __m512 e = exp_nonpositive(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sr + j), shift), factor));
        _mm512_mask_storeu_ps(sr + j, m, e);
        total = _mm512_mask_add_ps(total, m, total, e);
      }
      const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
      for (int64_t j = 0; j < r1; j += 16) {  // zeros past the valid keys
        const __mmask16 m = j < valid ? first(valid - j) : __mmask16(0);
        store_bf16(pr + j, _mm512_maskz_mul_ps(m, _mm512_maskz_loadu_ps(m, sr + j), inv), first(r1 - j));
      }
    }
}

// C[m0 .. m0+rows, n0 .. n0+16*V) of a GEMM, rows <= MR; `mask` limits the last vector's columns.
template <int MR, int V>
void gemm_tile(const PairsA& a, const PairsB& b, int64_t pairs, bool tail, float* c, int64_t ldc, int64_t m0,
               int64_t rows, int64_t n0, __mmask16 mask, bool accumulate) {
  __m512 acc[MR][V];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = _mm512_setzero_ps();
  const at::BFloat16* ar[MR];
  for (int i = 0; i < MR; ++i) ar[i] = a.data + (m0 + std::min<int64_t>(i, rows - 1)) * a.row;  // spare rows repeat the last
  const uint32_t* bp = b.data + n0;
  for (int64_t p = 0; p < pairs; ++p, bp += b.ld) {
    __m512 bv[V];
    for (int v = 0; v < V; ++v) bv[v] = _mm512_castsi512_ps(_mm512_loadu_si512(bp + 16 * v));
    for (int i = 0; i < MR; ++i) {
      const __m512 av = broadcast_word(ar[i] + p * a.pair);
      for (int v = 0; v < V; ++v) acc[i][v] = dot_pairs(acc[i][v], av, bv[v]);
    }
  }
  if (tail) {
    __m512 bv[V];
    for (int v = 0; v < V; ++v) bv[v] = _mm512_castsi512_ps(_mm512_loadu_si512(bp + 16 * v));
    for (int i = 0; i < MR; ++i) {
      const __m512 av = broadcast_half_word(ar[i] + 2 * pairs);
      for (int v = 0; v < V; ++v) acc[i][v] = dot_pairs(acc[i][v], av, bv[v]);
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    float* cr = c + (m0 + i) * ldc + n0;
    for (int v = 0; v < V; ++v) {
      const __mmask16 m = v == V - 1 ? mask : __mmask16(0xFFFF);
      __m512 out = acc[i][v];
      if (accumulate) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(m, cr + 16 * v));
      _mm512_mask_storeu_ps(cr + 16 * v, m, out);
    }
  }
}

// C (M x N, fp32, row stride ldc) = A @ B, or += with `accumulate`, over `pairs` words of the
// reduction (plus the tail element). Single-threaded: the callers run one per task.
void gemm_bf16(const PairsA& a, int64_t M, const PairsB& b, int64_t N, int64_t pairs, bool tail, float* c, int64_t ldc,
               bool accumulate) {
  constexpr int MR = 6, V = 4;
  int64_t n0 = 0;
  for (; n0 + 16 * V <= N; n0 += 16 * V)  // whole 64-column tiles: B's tile stays in cache across A's rows
    for (int64_t m0 = 0; m0 < M; m0 += MR) gemm_tile<MR, V>(a, b, pairs, tail, c, ldc, m0, std::min<int64_t>(MR, M - m0), n0, 0xFFFF, accumulate);
  for (; n0 < N; n0 += 16) {  // the last columns, 16 at a time
    for (int64_t m0 = 0; m0 < M; m0 += 2 * MR)
      gemm_tile<2 * MR, 1>(a, b, pairs, tail, c, ldc, m0, std::min<int64_t>(2 * MR, M - m0), n0, first(N - n0), accumulate);
  }
}

// Scratch memory of the calling thread that outlives the call: a task takes its buffers from here
// (slot by slot) instead of allocating ~1.5 MB for each task of each layer. It grows to the largest
// task seen (about 2 MB per thread at 512 tokens) and is uninitialised.
template <typename T>
T* scratch(int slot, int64_t n) {
  constexpr int kSlots = 16;
  thread_local std::vector<char> buffers[kSlots];
  std::vector<char>& b = buffers[slot];
  const size_t bytes = static_cast<size_t>(n) * sizeof(T) + 64;
  if (b.size() < bytes) b.resize(bytes);
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(b.data()) + 63) & ~uintptr_t(63));  // 64-byte aligned
}
#endif  // LORAKIT_BF16_GEMM

template <typename scalar_t>
void forward_task(const Task& t, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                  const at::Tensor& probs, float scale, int64_t per_group) {
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
    causal_softmax_rows(s, p, per_group, rows, r0, r1, 1.f);
    mm_into(obuf.narrow(0, 0, n), view(p, {n, r1}, opts), values.narrow(0, 0, r1));
    scatter_tokens(obuf.data_ptr<scalar_t>(), per_group, rows, d, 1.f, orows, t.row, h0, t.start + r0);
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
      for (int64_t j = 0; j < d; ++j) sum += load(g + j) * load(o + j);
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
    softmax_gradient_rows(p, ds, ds, delta.data() + r0, length, per_group, rows, r0, r1);
    at::Tensor dsb = view(ds, {n, r1}, opts);
    mm_into(dbuf.narrow(0, 0, n), dsb, keys.narrow(0, 0, r1));
    scatter_tokens(dbuf.data_ptr<scalar_t>(), per_group, rows, d, scale, dqrows, t.row, h0, t.start + r0);
    gather_heads(qrows, t.row, h0, per_group, t.start + r0, rows, d, 1.f, qbuf.data_ptr<scalar_t>());
    mm_into(kv, dsb.t(), qb);
    accumulate(grad_keys.data(), kvbuf.data_ptr<scalar_t>(), r1 * d);
    p += n * r1;
  }
  write_key_value_gradients<scalar_t>(t, grad_keys.data(), grad_values.data(), d, 1, d, scale, grad_k, grad_v);
}

#ifdef LORAKIT_BF16_GEMM
// forward_task for bf16 with the GEMMs above: the same blocks, softmax and outputs, but the scores
// come from bf16 pairs summed in fp32 (the same products as the fp32 GEMM of fp32 copies, summed in
// another order) and P @ V is rounded once, from fp32, into the output. The keys and values are
// packed once per task, for all of its blocks and query heads.
void forward_task_bf16(const Task& t, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& out, const at::Tensor& probs, float scale, int64_t per_group) {
  using bf16 = at::BFloat16;
  const int64_t d = q.size(3), h0 = t.kv_head * per_group, block = per_group * t.block_rows, length = t.length;
  const int64_t key_width = round_up16(length), d_width = round_up16(d);
  const Rows<const bf16> qrows(q), krows(k), vrows(v);
  const Rows<bf16> orows(out);
  uint32_t* keys = scratch<uint32_t>(0, (d + 1) / 2 * key_width);  // B of Q @ K^T: the keys' words as columns
  pack_column_pairs(krows.at(t.row, t.kv_head, t.start), length, d, krows.sy, key_width, keys);
  uint32_t* values = scratch<uint32_t>(1, (length + 1) / 2 * d_width);  // B of P @ V: pairs of value rows
  pack_row_pairs(vrows.at(t.row, t.kv_head, t.start), length, d, vrows.sy, values);
  bf16* qbuf = scratch<bf16>(2, block * d);
  float* sbuf = scratch<float>(3, block * length);
  float* obuf = scratch<float>(4, block * d);
  bf16* p = probs.data_ptr<bf16>() + t.prob_offset;
  for (int64_t r0 = 0; r0 < length; r0 += t.block_rows) {
    const int64_t r1 = std::min(length, r0 + t.block_rows), rows = r1 - r0, n = per_group * rows;
    gather_heads(qrows, t.row, h0, per_group, t.start + r0, rows, d, 1.f, qbuf);
    gemm_bf16({qbuf, d, 2}, n, {keys, key_width}, r1, d / 2, d % 2, sbuf, r1, false);
    causal_softmax_rows_bf16(sbuf, p, per_group, rows, r0, r1, scale);
    gemm_bf16({p, r1, 2}, n, {values, d_width}, d, r1 / 2, r1 % 2, obuf, d, false);
    scatter_tokens(obuf, per_group, rows, d, 1.f, orows, t.row, h0, t.start + r0);
    p += n * r1;
  }
}

// backward_task for bf16 with the GEMMs above. dV and dK are summed over the blocks transposed,
// (D, L) in fp32, as (dO^T @ P) and (Q^T @ dS), so that their reduction over the block's rows pairs
// consecutive rows (packed per block); dP and dQ reduce over D and over the keys. dP stays fp32
// into dS, and every gradient is rounded once.
void backward_task_bf16(const Task& t, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& out, const at::Tensor& probs, const at::Tensor& grad_q,
                        const at::Tensor& grad_k, const at::Tensor& grad_v, float scale, int64_t per_group) {
  using bf16 = at::BFloat16;
  const int64_t d = q.size(3), h0 = t.kv_head * per_group, block = per_group * t.block_rows, length = t.length;
  const int64_t key_width = round_up16(length), d_width = round_up16(d), block_pairs = (block + 1) / 2;
  const Rows<const bf16> qrows(q), krows(k), vrows(v), grows(grad_out), orows(out);
  uint32_t* keys = scratch<uint32_t>(0, (length + 1) / 2 * d_width);  // B of dS @ K: pairs of key rows
  pack_row_pairs(krows.at(t.row, t.kv_head, t.start), length, d, krows.sy, keys);
  uint32_t* values = scratch<uint32_t>(1, (d + 1) / 2 * key_width);  // B of dO @ V^T: the values' words as columns
  pack_column_pairs(vrows.at(t.row, t.kv_head, t.start), length, d, vrows.sy, key_width, values);
  float* grad_keys = scratch<float>(2, d * length);  // transposed: (D, L), summed over the blocks
  float* grad_values = scratch<float>(3, d * length);
  std::fill(grad_keys, grad_keys + d * length, 0.f);
  std::fill(grad_values, grad_values + d * length, 0.f);
  bf16* gbuf = scratch<bf16>(4, block * d);  // dO of the block
  bf16* qbuf = scratch<bf16>(5, block * d);
  bf16* ds = scratch<bf16>(6, block * length);
  uint32_t* g_pairs = scratch<uint32_t>(7, block_pairs * d_width);
  uint32_t* q_pairs = scratch<uint32_t>(8, block_pairs * d_width);
  uint32_t* p_pairs = scratch<uint32_t>(9, block_pairs * key_width);
  uint32_t* ds_pairs = scratch<uint32_t>(10, block_pairs * key_width);
  float* dp = scratch<float>(11, block * length);
  float* dq = scratch<float>(12, block * d);
  float* delta = scratch<float>(13, block);  // rowsum(P ∘ dP) = rowsum(dO ∘ O) per row of the block
  const Rows<bf16> dqrows(grad_q);
  const bf16* p = probs.data_ptr<bf16>() + t.prob_offset;
  // A operand read from row-pair words by column: word (m, p) of a (pairs, width) word matrix
  const auto by_column = [](const uint32_t* words, int64_t width) {
    return PairsA{reinterpret_cast<const bf16*>(words), 2, 2 * width};
  };
  for (int64_t r0 = 0; r0 < length; r0 += t.block_rows) {
    const int64_t r1 = std::min(length, r0 + t.block_rows), rows = r1 - r0, n = per_group * rows;
    const int64_t pairs = (n + 1) / 2, r1_width = round_up16(r1);
    gather_tokens(grows, t.row, h0, per_group, t.start + r0, rows, d, gbuf);
    for (int64_t h = 0; h < per_group; ++h)
      for (int64_t i = 0; i < rows; ++i) {
        const bf16* g = gbuf + (h * rows + i) * d;
        const bf16* o = orows.at(t.row, t.start + r0 + i, h0 + h);
        float sum = 0.f;
        for (int64_t j = 0; j < d; ++j) sum += load(g + j) * load(o + j);
        delta[h * rows + i] = sum;
      }
    // dV^T += dO^T @ P
    pack_row_pairs(gbuf, n, d, d, g_pairs);
    pack_row_pairs(p, n, r1, r1, p_pairs);
    gemm_bf16(by_column(g_pairs, d_width), d, {p_pairs, r1_width}, r1, pairs, false, grad_values, length, true);
    // dP = dO @ V^T, then dS = P ∘ (dP - delta)
    gemm_bf16({gbuf, d, 2}, n, {values, key_width}, r1, d / 2, d % 2, dp, r1, false);
    softmax_gradient_rows(p, dp, ds, delta, rows, per_group, rows, r0, r1);
    // dQ = dS @ K
    gemm_bf16({ds, r1, 2}, n, {keys, d_width}, d, r1 / 2, r1 % 2, dq, d, false);
    scatter_tokens(dq, per_group, rows, d, scale, dqrows, t.row, h0, t.start + r0);
    // dK^T += Q^T @ dS
    gather_heads(qrows, t.row, h0, per_group, t.start + r0, rows, d, 1.f, qbuf);
    pack_row_pairs(qbuf, n, d, d, q_pairs);
    pack_row_pairs(ds, n, r1, r1, ds_pairs);
    gemm_bf16(by_column(q_pairs, d_width), d, {ds_pairs, r1_width}, r1, pairs, false, grad_keys, length, true);
    p += n * r1;
  }
  write_key_value_gradients<bf16>(t, grad_keys, grad_values, 1, length, d, scale, grad_k, grad_v);  // sums are (D, L)
}
#endif  // LORAKIT_BF16_GEMM

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
// probability buffer (selective checkpointing keeps both, so its rerun calls nothing here).
// `bf16_gemm`: bf16 inputs run the GEMMs above where this build has them (bf16_gemm_available),
// otherwise oneDNN's; either backward takes either forward's buffer.
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                                     at::IntArrayRef segments, double scale, int64_t block_rows,
                                                     bool bf16_gemm) {
  check_inputs(query, key, value);
  const at::Tensor q = unit_stride(query), k = unit_stride(key), v = unit_stride(value);
  const int64_t kv_heads = k.size(1), per_group = q.size(1) / kv_heads;
  int64_t total = 0;
  const auto tasks = make_tasks(segments, q.size(0), q.size(2), kv_heads, per_group, block_rows, &total);
  at::Tensor probs = at::empty({total}, q.options());
  at::Tensor out = at::zeros(token_major(q), q.options());
#ifdef LORAKIT_BF16_GEMM
  if (bf16_gemm && q.scalar_type() == at::kBFloat16 && scale > 0) {  // its softmax scales after the max
    for_each_task(tasks, [&](const Task& t) {
      forward_task_bf16(t, q, k, v, out, probs, static_cast<float>(scale), per_group);
    });
    return {out, probs};
  }
#endif
  const auto run = [&](auto zero) {  // float32 or bfloat16 (check_inputs)
    using scalar_t = decltype(zero);
    for_each_task(tasks, [&](const Task& t) {
      forward_task<scalar_t>(t, q, k, v, out, probs, static_cast<float>(scale), per_group);
    });
  };
  if (q.scalar_type() == at::kFloat) run(float{}); else run(at::BFloat16{});
  return {out, probs};
}

// Gradients of attention_forward: grad_out (B, T, H, D) -> dQ (B, T, H, D), dK, dV (B, H_kv, T, D).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& grad_out, const at::Tensor& query,
                                                                  const at::Tensor& key, const at::Tensor& value,
                                                                  const at::Tensor& out, const at::Tensor& probs,
                                                                  at::IntArrayRef segments, double scale,
                                                                  int64_t block_rows, bool bf16_gemm) {
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
#ifdef LORAKIT_BF16_GEMM
  if (bf16_gemm && q.scalar_type() == at::kBFloat16) {
    for_each_task(tasks, [&](const Task& t) {
      backward_task_bf16(t, g, q, k, v, o, probs, grad_q, grad_k, grad_v, static_cast<float>(scale), per_group);
    });
    return {grad_q, grad_k, grad_v};
  }
#endif
  const auto run = [&](auto zero) {  // float32 or bfloat16 (check_inputs)
    using scalar_t = decltype(zero);
    for_each_task(tasks, [&](const Task& t) {
      backward_task<scalar_t>(t, g, q, k, v, o, probs, grad_q, grad_k, grad_v, static_cast<float>(scale), per_group);
    });
  };
  if (q.scalar_type() == at::kFloat) run(float{}); else run(at::BFloat16{});
  return {grad_q, grad_k, grad_v};
}

bool bf16_gemm_available() {
#ifdef LORAKIT_BF16_GEMM
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(lorakit_cpu, m) {
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, int[] segments, float scale, int block_rows, bool bf16_gemm) "
      "-> (Tensor, Tensor)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor probs, int[] segments, "
      "float scale, int block_rows, bool bf16_gemm) -> (Tensor, Tensor, Tensor)");
  m.def("bf16_gemm_available() -> bool");
}

TORCH_LIBRARY_IMPL(lorakit_cpu, CPU, m) {
  m.impl("attention_forward", &attention_forward);
  m.impl("attention_backward", &attention_backward);
}

TORCH_LIBRARY_IMPL(lorakit_cpu, CatchAll, m) { m.impl("bf16_gemm_available", &bf16_gemm_available); }
