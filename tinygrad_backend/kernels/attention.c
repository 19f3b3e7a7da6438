// The kernel of attention_kernel.py; it defines the macros used here and replaces NAME with the kernel's name.
#define QDIM (HEADS * HD)
#define KVDIM (KV_HEADS * HD)
#define GROUP (HEADS / KV_HEADS)
// the cache holds halves (forward.py says why); clang converts 16 at a time (vcvtph2ps, vcvtps2ph)
typedef __fp16 f16x16 __attribute__((aligned(2), ext_vector_type(16)));

// tinygrad's RoPE layout (half split): x[i] and x[i + ROPE/2] rotate together; freqs holds cos then sin
static inline void rope(const float* restrict x, const float* restrict freqs, float* restrict out) {
  for (int i = 0; i < ROPE / 2; i++) {
    float c = freqs[i], s = freqs[ROPE / 2 + i];
    out[i] = x[i] * c - x[ROPE / 2 + i] * s;
    out[ROPE / 2 + i] = x[ROPE / 2 + i] * c + x[i] * s;
  }
  for (int i = ROPE; i < HD; i++) out[i] = x[i];
}

void NAME(float* restrict out, const float* restrict qkv, __fp16* restrict cache, const float* restrict freqs,
          const int* restrict where, int core_id) {
  // work shared out by kv head, rows in order: a thread writes the keys and values it then reads (a prompt
  // chunk's later rows read its earlier rows' keys), so none waits on another
  for (int job = 0; job < ROWS * KV_HEADS; job++) {
    const int r = job / KV_HEADS, kvh = job % KV_HEADS;
    if (kvh % THREADS != core_id) continue;
    const int slot = where[2 * r], pos = where[2 * r + 1];
    const float* row = qkv + (long)r * (QDIM + 2 * KVDIM);
    const float* cs = freqs + (long)pos * ROPE;
    __fp16* keys = cache + ((long)slot * KV_HEADS + kvh) * ROOM * HD;
    __fp16* values = cache + (((long)SLOTS + slot) * KV_HEADS + kvh) * ROOM * HD;
    float key[HD] __attribute__((aligned(64)));
    rope(row + QDIM + kvh * HD, cs, key);
    for (int i = 0; i < HD / 16; i++) {
      *(f16x16*)(keys + (long)pos * HD + 16 * i) = __builtin_convertvector(*(const f32x16*)(key + 16 * i), f16x16);
      *(f16x16*)(values + (long)pos * HD + 16 * i) =
        __builtin_convertvector(*(const f32x16*)(row + QDIM + KVDIM + kvh * HD + 16 * i), f16x16);
    }

    float scores[ROOM];
    for (int g = 0; g < GROUP; g++) {
      const int h = kvh * GROUP + g;  // query head h reads kv head h / GROUP
      float q[HD] __attribute__((aligned(64)));
      rope(row + h * HD, cs, q);
      float best = -3.0e38f;
      for (int t = 0; t <= pos; t++) {
        f32x16 acc = 0;
        for (int d = 0; d < HD; d += 16)
          acc += *(const f32x16*)(q + d) * __builtin_convertvector(*(const f16x16*)(keys + (long)t * HD + d), f32x16);
        scores[t] = sum16(acc) * SCALE;
        best = scores[t] > best ? scores[t] : best;
      }
      float total = 0;
      for (int t = 0; t <= pos; t++) {
        scores[t] = exp_approx(scores[t] - best);
        total += scores[t];
      }
      f32x16 acc[HD / 16];
      for (int i = 0; i < HD / 16; i++) acc[i] = 0;
      for (int t = 0; t <= pos; t++)
        for (int i = 0; i < HD / 16; i++)
          acc[i] += scores[t] * __builtin_convertvector(*(const f16x16*)(values + (long)t * HD + 16 * i), f32x16);
      float* o = out + (long)r * QDIM + h * HD;
      for (int i = 0; i < HD / 16; i++) *(f32x16*)(o + 16 * i) = acc[i] / total;
    }
  }
}
