// Helpers our C kernels share (cpu_kernel.py prepends this file to each kernel's source).
typedef float f32x16 __attribute__((aligned(4), ext_vector_type(16)));
typedef signed char i8x16 __attribute__((aligned(1), ext_vector_type(16)));
typedef unsigned char u8x16 __attribute__((aligned(1), ext_vector_type(16)));

static inline float sum16(f32x16 v) {
  float s = 0;
  for (int i = 0; i < 16; i++) s += v[i];
  return s;
}

// e^x (no libm): 2^(x log2 e), the integer part into the exponent bits, the fraction by a degree-6 polynomial
static inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  float t = x * 1.44269504089f;
  float n = __builtin_floorf(t), f = t - n;
  float p = 1.0f + f * (0.693147182f + f * (0.240226507f + f * (0.0555041087f + f * (0.00961812911f
          + f * (0.00133335581f + f * 0.000154035304f)))));
  union { float f; int i; } u = { p };
  u.i += (int)n << 23;
  return u.f;
}
