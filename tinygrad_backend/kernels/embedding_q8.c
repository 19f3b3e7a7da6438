// Token embedding lookup from Q8_0 blocks (ggml's layout: per block of 32 values an fp16 scale d, then 32 int8
// steps q; value = d * q in fp32, as tinygrad's GGUF dequantization computes it), so the table stays the
// file's 1.06 bytes a value instead of 4. out: ROWS x DIM fp32; tokens: ROWS ids; blocks: VOCAB rows of
// DIM / 32 blocks. An id outside the vocabulary gives a row of zeros, as tinygrad's one-hot lookup does.
void NAME(float* restrict out, const int* restrict tokens, const unsigned char* restrict blocks, int core_id) {
  (void)core_id;
  for (int r = 0; r < ROWS; r++) {
    int t = tokens[r];
    float* o = out + (long)r * DIM;
    if (t < 0 || t >= VOCAB) {
      for (int i = 0; i < DIM; i++) o[i] = 0.0f;
      continue;
    }
    const unsigned char* row = blocks + (long)t * (DIM / 32) * 34;
    for (int b = 0; b < DIM / 32; b++) {
      const unsigned char* block = row + b * 34;
      __fp16 h;
      __builtin_memcpy(&h, block, 2);
      float d = (float)h;
      const signed char* q = (const signed char*)(block + 2);
      for (int i = 0; i < 32; i++) o[b * 32 + i] = d * (float)q[i];
    }
  }
}
