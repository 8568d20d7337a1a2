// exp of 16 floats at once with AVX-512, for the softmax loops of the loss and attention kernels.
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

namespace lorakit_kernels {

// exp(x) for x <= 0 (in a softmax, x is a score minus its row's max), within one fp32 unit in the
// last place (0.93 at most, checked against double precision on a 1e-4 grid over [-104, 0]):
// x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so r is exact), exp(r) by its Taylor series
// to r^7 (truncation error below 6e-9 relative), times 2^n. x is held at -200 or above, where the
// result is 0, so that -inf gives 0 rather than NaN; a NaN x stays NaN (max returns its second
// operand on NaN).
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-200.f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

}  // namespace lorakit_kernels

#endif  // __AVX512F__
