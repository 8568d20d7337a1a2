// bf16 products with fp32 sums on AVX512-BF16: the building blocks shared by the attention and
// LoRA kernels.
//
// One instruction (vdpbf16ps) multiplies 16 pairs of bf16 values and adds them into 16 fp32 sums,
// so both operands come paired along the reduction: 32-bit words of two consecutive reduction
// elements, one operand broadcast a word at a time, the other 16 words (16 output columns) per
// vector. Every result stays fp32 until a kernel rounds it once.
//
// LORAKIT_BF16_GEMM is defined where the compiler targets such a CPU (-march=native on one);
// elsewhere nothing here exists and the kernels keep their other paths.
#pragma once

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define LORAKIT_BF16_GEMM 1
#endif

#ifdef LORAKIT_BF16_GEMM
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace lorakit_kernels {

inline int64_t round_up16(int64_t n) { return (n + 15) / 16 * 16; }

inline __m512 broadcast_word(const c10::BFloat16* p) {
  float word;  // two bf16 values as one 32-bit lane, loaded into the broadcast
  std::memcpy(&word, p, 4);
  return _mm512_set1_ps(word);
}

inline __m512 broadcast_half_word(const c10::BFloat16* p) {  // (p[0], 0)
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return _mm512_castsi512_ps(_mm512_set1_epi32(bits));
}

inline __m512 dot_pairs(__m512 sum, __m512 a, __m512 b) { return _mm512_dpbf16_ps(sum, (__m512bh)a, (__m512bh)b); }

// The lanes of a 16-wide step that hold one of the `count` elements left (none when count <= 0).
inline __mmask16 first(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : count <= 0 ? __mmask16(0) : static_cast<__mmask16>((1u << count) - 1);
}

// Rounds 16 floats to bf16 (to nearest even, as c10::BFloat16 does) and stores the lanes of `mask`.
inline void store_bf16(c10::BFloat16* dst, __m512 v, __mmask16 mask) {
  _mm256_mask_storeu_epi16(dst, mask, (__m256i)_mm512_cvtneps_pbh(v));
}

// 16 elements of one row (lo) and 16 of the next (hi) as 16 words (lo[i], hi[i]).
inline __m512 interleave_rows(__m512i lo, __m512i hi) {
  static const __m512i order = [] {
    alignas(64) int16_t idx[32];
    for (int i = 0; i < 16; ++i) idx[2 * i] = static_cast<int16_t>(i), idx[2 * i + 1] = static_cast<int16_t>(32 + i);
    return _mm512_load_si512(idx);
  }();
  return _mm512_castsi512_ps(_mm512_permutex2var_epi16(lo, order, hi));
}

// Up to 16 elements of a bf16 row from `p` (the lanes of `mask`, zero elsewhere), as the low half of
// a vector for interleave_rows.
inline __m512i load_half(const c10::BFloat16* p, __mmask16 mask) {
  return _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(mask, p));
}

// Rows 2p and 2p+1 of a (R, D) bf16 matrix (row stride ld) interleaved into row p of words: the
// paired operand of a reduction over R (and, read by column, the broadcast one). Odd R pairs the
// last row with zeros. `out` holds (R + 1) / 2 rows of round_up16(D) words, zero past D.
inline void pack_row_pairs(const c10::BFloat16* src, int64_t R, int64_t D, int64_t ld, uint32_t* out) {
  const int64_t width = round_up16(D);
  for (int64_t p = 0; p < (R + 1) / 2; ++p) {
    const c10::BFloat16* r0 = src + 2 * p * ld;
    const bool pair = 2 * p + 1 < R;
    uint32_t* o = out + p * width;
    for (int64_t j = 0; j < width; j += 16) {
      const __mmask16 mask = first(D - j);
      const __m512i hi = pair ? load_half(r0 + ld + j, mask) : _mm512_setzero_si512();
      _mm512_storeu_ps(reinterpret_cast<float*>(o + j), interleave_rows(load_half(r0 + j, mask), hi));
    }
  }
}

// The words of a (R, D) bf16 matrix's rows (D even; odd D pairs the last column with zero) as
// columns: word (p, r) = (m[r][2p], m[r][2p+1]). The B operand for a reduction over D, where the
// matrix's rows are the output's columns. `out` holds (D + 1) / 2 rows of `width` words (width a
// multiple of 16, >= R), zero past R.
inline void pack_column_pairs(const c10::BFloat16* src, int64_t R, int64_t D, int64_t ld, int64_t width,
                              uint32_t* out) {
  const int64_t pairs = (D + 1) / 2;
  std::memset(out, 0, sizeof(uint32_t) * pairs * width);
  for (int64_t r = 0; r < R; ++r) {
    const c10::BFloat16* row = src + r * ld;
    for (int64_t p = 0; p < D / 2; ++p) std::memcpy(out + p * width + r, row + 2 * p, 4);
    if (D % 2) std::memcpy(out + (D / 2) * width + r, row + D - 1, 2);  // upper half stays zero
  }
}

}  // namespace lorakit_kernels
#endif  // LORAKIT_BF16_GEMM
