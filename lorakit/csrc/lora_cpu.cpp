// The rank-r products of a LoRA layer in bf16, for CPUs with AVX512-BF16.
//
// A LoRA layer's forward and backward run four products whose one side is r columns wide (r = 16
// in most setups) against a (T, in) or (T, out) activation:
//   forward    x @ A^T                     (T, r)    lora_project(x, A^T)
//   backward   g @ B                       (T, r)    lora_project(g, B)
//              s · (x @ A^T)^T @ g         (r, out)  lora_outer(x @ A^T, g, s)   = grad B^T
//              s · (g @ B)^T @ x           (r, in)   lora_outer(g @ B, x, s)     = grad A
// Each reads its big operand once and does 2·r FLOPs per element of it, too little work for
// oneDNN's GEMMs, tuned for larger shapes, to run well. Against them on the benchmark's layers
// (T = 1024; 256, 768 and 2048 wide; r = 16; 2 threads): lora_project 0.7-0.75x their time with
// the operands in cache, 0.55-0.95x from memory; lora_outer 0.65-1.0x and 0.5-0.7x. In a
// training step of the benchmark model the four products take 12.4 ms instead of 19.5. Their sums
// stay fp32 until the end: lora_project rounds its (T, r) result to bf16 once, and lora_outer
// returns fp32, so the adapters' gradients are no longer rounded to bf16 before their fp32 update.
//
// The other rank-r work, adding s · (x @ A^T) @ B^T into the output and s · (g @ B) @ A into the
// input gradient, stays with addmm_: a kernel of the same kind (tiles of 8 rows, b's columns in
// L1, the next tile prefetched) gave addmm_'s results bit for bit and was 2x faster with the
// output in memory, but in a training step, where the output comes fresh from the GEMM before,
// the adds took 6.7 ms against 7.2: not worth the code.
//
// Registered as torch.ops.lorakit_cpu.lora_project / lora_outer; lorakit.fused calls them where
// bf16_gemm_available() says this build has them (-march=native on an AVX512-BF16 CPU).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "bf16_pairs.h"

namespace {

#ifdef LORAKIT_BF16_GEMM
using lorakit_kernels::broadcast_half_word;
using lorakit_kernels::broadcast_word;
using lorakit_kernels::dot_pairs;
using lorakit_kernels::first;
using lorakit_kernels::interleave_rows;
using lorakit_kernels::load_half;
using lorakit_kernels::pack_column_pairs;
using lorakit_kernels::pack_row_pairs;
using lorakit_kernels::round_up16;
using lorakit_kernels::store_bf16;
using bf16 = at::BFloat16;

constexpr int64_t kMaxRank = 64;

// Rows m0 .. m0+rows (rows <= MR) of x @ W into `out` (row stride r, bf16): x's rows are read as
// words of two consecutive elements (broadcast), W as packed words (K+1)/2 x width, V vectors of 16
// of W's columns. An odd K's last element is paired with zero.
template <int MR, int V>
void project_rows(const bf16* x, int64_t ldx, int64_t rows, int64_t K, const uint32_t* w, int64_t width, bf16* out,
                  int64_t r) {
  __m512 acc[MR][V];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = _mm512_setzero_ps();
  const bf16* xr[MR];
  for (int i = 0; i < MR; ++i) xr[i] = x + std::min<int64_t>(i, rows - 1) * ldx;  // spare rows repeat the last
  const int64_t pairs = K / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512 wv[V];
    for (int v = 0; v < V; ++v) wv[v] = _mm512_loadu_ps(reinterpret_cast<const float*>(w + p * width + 16 * v));
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = broadcast_word(xr[i] + 2 * p);
      for (int v = 0; v < V; ++v) acc[i][v] = dot_pairs(acc[i][v], xv, wv[v]);
    }
  }
  if (K % 2) {
    __m512 wv[V];
    for (int v = 0; v < V; ++v) wv[v] = _mm512_loadu_ps(reinterpret_cast<const float*>(w + pairs * width + 16 * v));
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = broadcast_half_word(xr[i] + K - 1);
      for (int v = 0; v < V; ++v) acc[i][v] = dot_pairs(acc[i][v], xv, wv[v]);
    }
  }
  // constant bounds (the test inside): a loop that ends at `rows` would make the compiler keep
  // acc in memory rather than in registers
  for (int i = 0; i < MR; ++i)
    if (i < rows)
      for (int v = 0; v < V; ++v) store_bf16(out + i * r + 16 * v, acc[i][v], first(r - 16 * v));
}

// Register tiles: MR rows x V vectors of sums, plus V weight vectors and a broadcast, within the
// 32 vector registers.
template <int V>
constexpr int project_tile_rows() {
  return V == 1 ? 12 : V == 2 ? 8 : V == 3 ? 6 : 4;
}

template <int V>
void project_all(const bf16* x, int64_t ldx, int64_t T, int64_t K, const uint32_t* w, int64_t width, bf16* out,
                 int64_t r) {
  constexpr int MR = project_tile_rows<V>();
  const int64_t tiles = (T + MR - 1) / MR;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t m0 = tile * MR;
      project_rows<MR, V>(x + m0 * ldx, ldx, std::min<int64_t>(MR, T - m0), K, w, width, out + m0 * r, r);
    }
  });
}

// x (T, K) bf16 with unit stride in K, weight (K, r) bf16 of any strides, r <= 64: x @ weight as
// (T, r) bf16, each element an fp32 sum rounded once.
at::Tensor lora_project(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(0),
              "lora_project: x (T, K) @ weight (K, r)");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16, "lora_project: bfloat16 only");
  TORCH_CHECK(weight.size(1) <= kMaxRank, "lora_project: rank above ", kMaxRank);
  const at::Tensor xs = x.stride(1) == 1 ? x : x.contiguous();
  const int64_t T = xs.size(0), K = xs.size(1), r = weight.size(1), width = round_up16(r);
  at::Tensor out = at::empty({T, r}, xs.options());
  if (T == 0 || r == 0) return out;
  // W's rows in pairs: word (p, j) = (W[2p, j], W[2p+1, j]); K x r elements, a few KB
  std::vector<uint32_t> w(static_cast<size_t>((K + 1) / 2 * width), 0u);
  if (weight.stride(0) == 1 && weight.stride(1) >= K) {
    // W = A^T for a row-major A (r, K), as x @ A^T passes it: each word is two adjacent elements of
    // a row of A, copied whole (transposing A into a contiguous W first cost as much again)
    pack_column_pairs(weight.data_ptr<bf16>(), r, K, weight.stride(1), width, w.data());
  } else {
    const at::Tensor wc = weight.contiguous();
    pack_row_pairs(wc.data_ptr<bf16>(), K, r, r, w.data());
  }
  const bf16* xd = xs.data_ptr<bf16>();
  bf16* od = out.data_ptr<bf16>();
  const int64_t ldx = xs.stride(0);
  switch (width / 16) {
    case 1: project_all<1>(xd, ldx, T, K, w.data(), width, od, r); break;
    case 2: project_all<2>(xd, ldx, T, K, w.data(), width, od, r); break;
    case 3: project_all<3>(xd, ldx, T, K, w.data(), width, od, r); break;
    default: project_all<4>(xd, ldx, T, K, w.data(), width, od, r); break;
  }
  return out;
}

// Sums j0 .. j0+16 of one 16-column slice of left^T @ right over row pairs p0 .. p1, into `out`
// (row stride N): started from zero on the first block, else from `out`; scaled on the last.
// right's rows are paired on the fly (16 columns of rows t and t+1 interleaved into one vector of
// words); left comes packed the same way, one word per sum, broadcast.
void outer_block(const bf16* right, int64_t ld, int64_t T, const uint32_t* left_words, int64_t width, int64_t p0,
                 int64_t p1, int64_t n0, __mmask16 m, int64_t j0, int64_t r, float* out, int64_t N, bool first_block,
                 bool last_block, float scale) {
  // The loops over j unrolled on demand: left to itself GCC kept acc in memory and stored it on
  // every step (2x slower).
  __m512 acc[16];
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j)
    acc[j] = first_block || j0 + j >= r ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m, out + (j0 + j) * N + n0);
  const int64_t whole = std::min(p1, T / 2);  // an odd T's last row is paired with zero below
  for (int64_t p = p0; p < whole; ++p) {
    const bf16* row = right + 2 * p * ld + n0;
    const __m512 rv = interleave_rows(load_half(row, m), load_half(row + ld, m));
    const bf16* words = reinterpret_cast<const bf16*>(left_words + p * width + j0);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) acc[j] = dot_pairs(acc[j], broadcast_word(words + 2 * j), rv);
  }
  if (whole < p1) {
    const __m512 rv = interleave_rows(load_half(right + (T - 1) * ld + n0, m), _mm512_setzero_si512());
    const bf16* words = reinterpret_cast<const bf16*>(left_words + whole * width + j0);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) acc[j] = dot_pairs(acc[j], broadcast_word(words + 2 * j), rv);
  }
  const __m512 factor = _mm512_set1_ps(last_block ? scale : 1.f);
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j)
    if (j0 + j < r) _mm512_mask_storeu_ps(out + (j0 + j) * N + n0, m, _mm512_mul_ps(acc[j], factor));
}

// left (T, r) bf16, right (T, N) bf16 with unit stride in N, r <= 64: scale · left^T @ right as
// (r, N) fp32.
//
// The reduction runs over T, so right is read in 16-column slices of row pairs (outer_block). Each
// thread takes a range of slices and walks right in blocks of 64 rows: a slice's sums stay in
// registers over a block, and the block's cache lines, fetched for its first slice, serve the next
// one too. Walking 32 bytes a row leaves the hardware's prefetcher idle, so the lines two slices
// on (or, at the end of the range, the next block's first) are prefetched into L2. Not L1: with
// rows 4 KB apart (2048 columns) a slice's 64 rows all fall in one L1 set.
// Against torch's matmul (oneDNN) on 1024 rows, 256-2048 columns, r = 16, 2 threads: 0.65-1.0x
// its time with right in cache, 0.5-0.7x with right in memory.
at::Tensor lora_outer(const at::Tensor& left, const at::Tensor& right, double scale) {
  TORCH_CHECK(left.dim() == 2 && right.dim() == 2 && left.size(0) == right.size(0),
              "lora_outer: left (T, r), right (T, N)");
  TORCH_CHECK(left.scalar_type() == at::kBFloat16 && right.scalar_type() == at::kBFloat16, "lora_outer: bfloat16 only");
  TORCH_CHECK(left.size(1) <= kMaxRank, "lora_outer: rank above ", kMaxRank);
  const at::Tensor rs = right.stride(1) == 1 ? right : right.contiguous();
  const at::Tensor ls = left.contiguous();
  const int64_t T = rs.size(0), N = rs.size(1), r = ls.size(1), width = round_up16(r), pairs = (T + 1) / 2;
  at::Tensor out = at::empty({r, N}, rs.options().dtype(at::kFloat));
  if (T == 0) return out.zero_();
  if (r == 0 || N == 0) return out;
  std::vector<uint32_t> words(static_cast<size_t>(pairs * width));  // word (p, j) = (left[2p, j], left[2p+1, j])
  pack_row_pairs(ls.data_ptr<bf16>(), T, r, r, words.data());
  const bf16* rd = rs.data_ptr<bf16>();
  const uint32_t* lw = words.data();
  const int64_t ld = rs.stride(0);
  float* od = out.data_ptr<float>();
  constexpr int64_t kBlockPairs = 32;
  at::parallel_for(0, (N + 15) / 16, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p0 = 0; p0 < pairs; p0 += kBlockPairs) {
      const int64_t p1 = std::min(pairs, p0 + kBlockPairs);
      for (int64_t s = begin; s < end; ++s) {
        if (((s - begin) & 1) == 0) {  // one 64-byte line covers two slices
          const bool next_block = s + 2 >= end;
          const int64_t t0 = 2 * (next_block ? p1 : p0), t1 = std::min(T, t0 + 2 * kBlockPairs);
          const bf16* column = rd + (next_block ? 16 * begin : 16 * (s + 2));
          for (int64_t t = t0; t < t1; ++t) _mm_prefetch(reinterpret_cast<const char*>(column + t * ld), _MM_HINT_T1);
        }
        for (int64_t j0 = 0; j0 < r; j0 += 16)
          outer_block(rd, ld, T, lw, width, p0, p1, 16 * s, first(N - 16 * s), j0, r, od, N, p0 == 0, p1 == pairs,
                      static_cast<float>(scale));
      }
    }
  });
  return out;
}
#endif  // LORAKIT_BF16_GEMM

}  // namespace

#ifdef LORAKIT_BF16_GEMM
TORCH_LIBRARY_FRAGMENT(lorakit_cpu, m) {
  m.def("lora_project(Tensor x, Tensor weight) -> Tensor");
  m.def("lora_outer(Tensor left, Tensor right, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lorakit_cpu, CPU, m) {
  m.impl("lora_project", &lora_project);
  m.impl("lora_outer", &lora_outer);
}
#endif
