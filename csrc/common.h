// Shared helpers of the CPU kernels: dtype conversion, order-preserving keys, work blocks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

// Hot loops are compiled for AVX-512 and AVX2 as well as the baseline ISA and picked at load time
// (GCC/Clang function multiversioning), so the package stays portable without -march=native.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FSMTL_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#define FSMTL_X86 1
#else
#define FSMTL_MULTIVERSION
#endif

namespace fsmtl {

// Loads one gradient entry as float32. bf16 is the upper half of a float32, so a shift is exact
// and vectorizes; c10::Half's conversion is branch-free bit arithmetic.
inline float to_float(float v) { return v; }
inline float to_float(double v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }
inline float to_float(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// fp16 -> fp32 for n entries. c10::Half's portable conversion is scalar bit arithmetic (about 28 ms
// for the upcast-square-add of 1e7 entries on a 2-core Xeon); where the CPU has F16C, 8 entries
// convert per instruction.
#ifdef FSMTL_X86
__attribute__((target("avx2,f16c"))) inline void half_to_float_f16c(const c10::Half* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(h));
  }
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}
#endif

// True where the fp16 paths may use AVX2 + F16C + FMA.
inline bool cpu_has_f16c() {
#ifdef FSMTL_X86
  static const bool has =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

inline void half_to_float(const c10::Half* src, float* dst, int64_t n) {
#ifdef FSMTL_X86
  if (cpu_has_f16c()) {
    half_to_float_f16c(src, dst, n);
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

// Stores a float32 result in the output dtype with the same rounding as Tensor.copy_
// (round to nearest even for fp16/bf16, exact widening for fp64).
template <typename T>
inline T from_float(float v) {
  return static_cast<T>(v);
}

// Order-preserving key of a float32: a > b (as floats, NaN excluded) iff key(a) > key(b).
// -0.0 is first turned into +0.0 so both get the same key, as the reference compares them equal.
inline uint32_t float_key(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  u = (u == 0x80000000u) ? 0u : u;
  // Negative floats: flip every bit (larger magnitude -> smaller key); positive: set the sign bit.
  const uint32_t flip = static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u;
  return u ^ flip;
}

// A contiguous range [begin, end) of the entries of parameter `param`; `pos` is the global
// position of `begin` (parameters laid end to end, in order). Blocks never cross a parameter.
struct Block {
  int64_t param;
  int64_t begin;
  int64_t end;
  int64_t pos;
};

// Splits parameters of `numels` entries into blocks of at most `block` entries (a multiple of 32,
// so every block of a packed mask starts on a fresh word), in position order.
inline std::vector<Block> make_blocks(const std::vector<int64_t>& numels, int64_t block) {
  std::vector<Block> blocks;
  int64_t pos = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(numels.size()); ++i) {
    for (int64_t b = 0; b < numels[i]; b += block) {
      blocks.push_back({i, b, std::min(numels[i], b + block), pos + b});
    }
    pos += numels[i];
  }
  return blocks;
}

// Groups consecutive blocks into at most `max_chunks` chunks of about equal entry counts, each
// chunk at least `min_entries` entries, returned as block-index boundaries [0, ..., blocks.size()].
// Chunk c is processed by one thread, so per-chunk results concatenate in position order.
inline std::vector<int64_t> make_chunks(const std::vector<Block>& blocks, int64_t total, int64_t max_chunks,
                                        int64_t min_entries) {
  int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(max_chunks, total / std::max<int64_t>(1, min_entries)));
  std::vector<int64_t> bounds{0};
  int64_t done = 0;
  int64_t b = 0;
  const int64_t n_blocks = static_cast<int64_t>(blocks.size());
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t target = total * c / chunks;
    while (b < n_blocks && done + (blocks[b].end - blocks[b].begin) <= target) {
      done += blocks[b].end - blocks[b].begin;
      ++b;
    }
    if (b > bounds.back()) bounds.push_back(b);
  }
  if (n_blocks > bounds.back()) bounds.push_back(n_blocks);
  return bounds;
}

}  // namespace fsmtl
