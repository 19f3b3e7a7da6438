// The kernel of packed_weights.py; it defines the macros used here and replaces NAME with the kernel's name.
#define BLOCKS (IN / 32)
#define FEW 8  // rows of x up to which each weight block is converted as it is used, else a whole row first
#define BLOCK_BYTES (BITS == 4 ? 16 : 32)
#define OUTPUTS (GLU ? OUT / 2 : OUT)

// the 32 steps of block b of a weight row, as two vectors of 16
static inline void steps(const unsigned char* row, int b, f32x16* lo, f32x16* hi) {
#if BITS == 4
  u8x16 v = *(const u8x16*)(row + b * 16);
  *lo = __builtin_convertvector(v & (unsigned char)15, f32x16);
  *hi = __builtin_convertvector(v >> (unsigned char)4, f32x16);
#else
  *lo = __builtin_convertvector(*(const i8x16*)(row + b * 32), f32x16);
  *hi = __builtin_convertvector(*(const i8x16*)(row + b * 32 + 16), f32x16);
#endif
}

// the products of weight row n with every row of x, into dot[ROWS]
static inline void row_dots(int n, const unsigned char* restrict q, const float* restrict scale,
                            const float* restrict offset, const float* restrict x, const float* restrict xsum,
                            float* restrict dot) {
  const unsigned char* row = q + (long)n * BLOCKS * BLOCK_BYTES;
  const float* s = scale + (long)n * BLOCKS;
  const float* o = offset + (long)n * BLOCKS;
#if ROWS <= FEW
  // few rows of x (decode, one per slot): convert each block once, as it is used, for every row of x; the
  // offsets multiply each block's sum of x. (Interleaving several weight rows measured slower here.)
  f32x16 acc[ROWS];
  float shift[ROWS];
  for (int r = 0; r < ROWS; r++) { acc[r] = 0; shift[r] = 0; }
  for (int b = 0; b < BLOCKS; b++) {
    f32x16 lo, hi;
    steps(row, b, &lo, &hi);
    for (int r = 0; r < ROWS; r++) {
      const float* xr = x + r * IN + b * 32;
      acc[r] += (lo * *(const f32x16*)xr + hi * *(const f32x16*)(xr + 16)) * s[b];
      shift[r] += o[b] * xsum[r * BLOCKS + b];
    }
  }
  for (int r = 0; r < ROWS; r++) dot[r] = sum16(acc[r]) + shift[r];
#else
  // many rows of x (a prompt chunk): dequantize the weight row once, then use it for four rows of x at a time
  float w[IN] __attribute__((aligned(64)));
  for (int b = 0; b < BLOCKS; b++) {
    f32x16 lo, hi;
    steps(row, b, &lo, &hi);
    float sb = s[b], ob = o[b];
    *(f32x16*)(w + b * 32) = lo * sb + ob;
    *(f32x16*)(w + b * 32 + 16) = hi * sb + ob;
  }
  int r = 0;
  for (; r + 4 <= ROWS; r += 4) {
    const float* x0 = x + r * IN;
    f32x16 a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (int k = 0; k < IN; k += 16) {
      f32x16 wk = *(const f32x16*)(w + k);
      a0 += wk * *(const f32x16*)(x0 + k);
      a1 += wk * *(const f32x16*)(x0 + IN + k);
      a2 += wk * *(const f32x16*)(x0 + 2 * IN + k);
      a3 += wk * *(const f32x16*)(x0 + 3 * IN + k);
    }
    dot[r] = sum16(a0); dot[r + 1] = sum16(a1); dot[r + 2] = sum16(a2); dot[r + 3] = sum16(a3);
  }
  for (; r < ROWS; r++) {
    f32x16 a = 0;
    for (int k = 0; k < IN; k += 16) a += *(const f32x16*)(w + k) * *(const f32x16*)(x + r * IN + k);
    dot[r] = sum16(a);
  }
#endif
}

// 4-bit weights on a CPU with AVX-512 VNNI: x is quantized to int16 per block of 32 (scale max|x| / 32767,
// so its rounding is ~1e-5 of the block's largest value: the sums stay those of the float path to a few
// parts per million) and each pair of blocks' products are integer dot products (vpdpwssd: 32 int16 pairs
// per instruction) instead of conversions to float and multiplies. (x as int8, as llama.cpp does it, is
// faster still, but its rounding lowered the next-token agreement with llama.cpp from 97% to 93%.)
#if BITS == 4 && INTEGER_DOTS && BLOCKS % 2 == 0 && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define VNNI 1
typedef short i16x32 __attribute__((aligned(2), ext_vector_type(32)));
typedef int i32x16 __attribute__((aligned(2), ext_vector_type(16)));
typedef unsigned char u8x32 __attribute__((aligned(1), ext_vector_type(32)));

// each row of x into xq: per pair of blocks, their first 16 values each (32), then their last 16 each, the
// order a pair's 32 bytes of nibbles unpack to; dx: each block's scale; xsum: its sum (for the offsets)
static void quantize_x(const float* restrict x, short* restrict xq, float* restrict dx, float* restrict xsum) {
  for (int r = 0; r < ROWS; r++)
    for (int b = 0; b < BLOCKS; b++) {
      const float* xb = x + r * IN + b * 32;
      float top = 0, total = 0;
      for (int j = 0; j < 32; j++) {
        float a = xb[j] < 0 ? -xb[j] : xb[j];
        top = a > top ? a : top;
        total += xb[j];
      }
      float inv = top > 0 ? 32767 / top : 0;
      dx[r * BLOCKS + b] = top / 32767;
      xsum[r * BLOCKS + b] = total;
      short* dst = xq + r * IN + (b / 2) * 64 + (b % 2) * 16;
      for (int j = 0; j < 16; j++) {
        float lo = xb[j] * inv, hi = xb[16 + j] * inv;
        dst[j] = (short)(int)(lo + (lo >= 0 ? 0.5f : -0.5f));
        dst[32 + j] = (short)(int)(hi + (hi >= 0 ? 0.5f : -0.5f));
      }
    }
}

static inline void row_dots_int(int n, const unsigned char* restrict q, const float* restrict scale,
                                const float* restrict offset, const short* restrict xq,
                                const float* restrict dx, const float* restrict xsum, float* restrict dot) {
  const unsigned char* row = q + (long)n * BLOCKS * 16;
  const float* s = scale + (long)n * BLOCKS;
  const float* o = offset + (long)n * BLOCKS;
  // up to FEW rows of x (a decode step's slots) share each unpacked pair of blocks; more (a prompt chunk)
  // would not fit their sums in registers, so they take the weight row once per row of x
  enum { SHARED = ROWS <= FEW ? ROWS : 1 };
  for (int r0 = 0; r0 < ROWS; r0 += SHARED) {
    f32x16 acc[SHARED];
    for (int r = 0; r < SHARED; r++) acc[r] = 0;
    for (int p = 0; p < BLOCKS / 2; p++) {
      u8x32 v = *(const u8x32*)(row + p * 32);
      i16x32 lo = __builtin_convertvector(v & (unsigned char)15, i16x32);
      i16x32 hi = __builtin_convertvector(v >> (unsigned char)4, i16x32);
      for (int r = 0; r < SHARED; r++) {
        const short* xr = xq + (r0 + r) * IN + p * 64;
        const float* d = dx + (r0 + r) * BLOCKS + 2 * p;
        i32x16 sums = 0;
        sums = __builtin_ia32_vpdpwssd512(sums, (i32x16)lo, *(const i32x16*)xr);
        sums = __builtin_ia32_vpdpwssd512(sums, (i32x16)hi, *(const i32x16*)(xr + 32));
        // lanes 0-7 hold the first block's sums, 8-15 the second's
        float s0 = s[2 * p] * d[0], s1 = s[2 * p + 1] * d[1];
        f32x16 scales = {s0, s0, s0, s0, s0, s0, s0, s0, s1, s1, s1, s1, s1, s1, s1, s1};
        acc[r] += __builtin_convertvector(sums, f32x16) * scales;
      }
    }
    for (int r = 0; r < SHARED; r++) {
      float shift = 0;
      for (int b = 0; b < BLOCKS; b++) shift += o[b] * xsum[(r0 + r) * BLOCKS + b];
      dot[r0 + r] = sum16(acc[r]) + shift;
    }
  }
}
#else
#define VNNI 0
#endif

void NAME(float* restrict out, const float* restrict x_in, const unsigned char* restrict q,
          const float* restrict scale, const float* restrict offset,
#if NORM
          const float* restrict norm_weight,
#endif
#if RESIDUAL
          const float* restrict residual,
#endif
          int core_id) {
  // this thread's share of the outputs
  const int per = (OUTPUTS + THREADS - 1) / THREADS, lo = core_id * per;
  const int hi = lo + per < OUTPUTS ? lo + per : OUTPUTS;
#if NORM
  // RMS norm of each row of x, every thread for itself (IN multiply-adds a row, next to OUT * IN)
  float x[ROWS * IN] __attribute__((aligned(64)));
  for (int r = 0; r < ROWS; r++) {
    float ss = 0;
    for (int k = 0; k < IN; k++) ss += x_in[r * IN + k] * x_in[r * IN + k];
    float inv = 1.0f / __builtin_sqrtf(ss / IN + EPS);
    for (int k = 0; k < IN; k++) x[r * IN + k] = x_in[r * IN + k] * inv * norm_weight[k];
  }
#else
  const float* x = x_in;
#endif
#if VNNI
  short xq[ROWS * IN] __attribute__((aligned(64)));
  float dx[ROWS * BLOCKS], xsum[ROWS * BLOCKS];
  quantize_x(x, xq, dx, xsum);
#define ROW_DOTS(n, result) row_dots_int(n, q, scale, offset, xq, dx, xsum, result)
#else
#define ROW_DOTS(n, result) row_dots(n, q, scale, offset, x, xsum, result)
#endif
#if ROWS <= FEW && !VNNI
  float xsum[ROWS * BLOCKS];
  for (int r = 0; r < ROWS; r++)
    for (int b = 0; b < BLOCKS; b++) {
      f32x16 v = *(const f32x16*)(x + r * IN + b * 32) + *(const f32x16*)(x + r * IN + b * 32 + 16);
      xsum[r * BLOCKS + b] = sum16(v);
    }
#elif !VNNI
  const float* xsum = 0;
#endif
  float dot[ROWS], up[ROWS];
  for (int n = lo; n < hi; n++) {
    ROW_DOTS(n, dot);
#if GLU
    ROW_DOTS(n + OUTPUTS, up);
    for (int r = 0; r < ROWS; r++) dot[r] = dot[r] / (1.0f + exp_approx(-dot[r])) * up[r];
#endif
    for (int r = 0; r < ROWS; r++) {
#if RESIDUAL
      out[(long)r * OUTPUTS + n] = residual[(long)r * OUTPUTS + n] + dot[r];
#else
      out[(long)r * OUTPUTS + n] = dot[r];
#endif
    }
  }
}
