// The exponential's core shared by the CPU kernels' vector code (common/vec.h, included once per
// instruction set by common/isa.h, and the ConvLSTM CPU kernel): no include guard, so that each
// instruction set's namespace gets its own copy compiled for its target.
#ifndef TC_INLINE
#define TC_INLINE inline __attribute__((always_inline))
#endif

// e^x for x = n ln2 + r, n an integer-valued float in [-126, 127] and |r| <= ln2 / 2 (the caller
// clamps x and rounds n): 2^n times Cephes' degree-6 polynomial of r (~1 ulp), with ln 2 in
// Cody-Waite's two parts. V: a GCC vector of floats, I: the int32 vector of the same lanes.
template <typename V, typename I>
TC_INLINE V exp_reduced(V x, V n) {
  const V r = x - n * 0.693359375f + n * 2.12194440e-4f;
  V y = V{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  return y * (V)((__builtin_convertvector(n, I) + 127) << 23);  // 2^n as float bits
}
