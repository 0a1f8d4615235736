// One task's masked gradient added into running sums on CPU (streaming form of paper Eq. 4):
//   acc_i += S_task,i * g_i
// g is converted to acc's dtype (float32 or float64), multiplied by the 0/1 mask bit (exact) and
// added: one rounding per entry, as in the reference (fsmtl_kernels/reference/masked_accumulate.py).
// A masked-out inf or NaN gives NaN (g * 0), as in the reference.
//
// Bytes moved: P * sizeof(grad) + P / 8 (one task's mask row) read, P * sizeof(acc) read and written.
#include <torch/library.h>

#include "common.h"

namespace fsmtl {
namespace {

constexpr int64_t kAccumulateBlock = 4096;  // entries per block (128 mask words)

template <typename A>
inline A to_acc(c10::Half v) {
  return static_cast<A>(static_cast<float>(v));
}
template <typename A>
inline A to_acc(c10::BFloat16 v) {
  return static_cast<A>(to_float(v));
}
template <typename A>
inline A to_acc(float v) {
  return static_cast<A>(v);
}
template <typename A>
inline A to_acc(double v) {
  return static_cast<A>(v);
}

// acc[j] += g[j] * bit_j for len <= kAccumulateBlock entries, bit j of words[j / 32]. Branch-free:
// the bit becomes a 0/1 multiplier so the loop vectorizes; full words run a fixed 32-entry loop.
template <typename A, typename G>
inline __attribute__((always_inline)) void accumulate_block(const G* g, const int32_t* words, int64_t len, A* acc) {
  const int64_t full = len / 32;
  for (int64_t w = 0; w < full; ++w) {
    const uint32_t word = static_cast<uint32_t>(words[w]);
    for (int64_t j = 0; j < 32; ++j) {
      const A bit = static_cast<A>((word >> j) & 1u);
      acc[32 * w + j] += to_acc<A>(g[32 * w + j]) * bit;
    }
  }
  if (len > 32 * full) {
    const uint32_t word = static_cast<uint32_t>(words[full]);
    for (int64_t j = 0; j < len - 32 * full; ++j) {
      const A bit = static_cast<A>((word >> j) & 1u);
      acc[32 * full + j] += to_acc<A>(g[32 * full + j]) * bit;
    }
  }
}

#define FSMTL_ACCUMULATE_KERNEL(NAME, A, G)                                     \
  FSMTL_MULTIVERSION                                                             \
  void NAME(const G* g, const int32_t* words, int64_t len, A* acc) { accumulate_block<A, G>(g, words, len, acc); }

FSMTL_ACCUMULATE_KERNEL(accumulate_f32_f32, float, float)
FSMTL_ACCUMULATE_KERNEL(accumulate_f32_f16, float, c10::Half)
FSMTL_ACCUMULATE_KERNEL(accumulate_f32_bf16, float, c10::BFloat16)
FSMTL_ACCUMULATE_KERNEL(accumulate_f32_f64, float, double)
FSMTL_ACCUMULATE_KERNEL(accumulate_f64_f32, double, float)
FSMTL_ACCUMULATE_KERNEL(accumulate_f64_f16, double, c10::Half)
FSMTL_ACCUMULATE_KERNEL(accumulate_f64_bf16, double, c10::BFloat16)
FSMTL_ACCUMULATE_KERNEL(accumulate_f64_f64, double, double)
#undef FSMTL_ACCUMULATE_KERNEL

template <typename A>
void accumulate_any(const at::Tensor& g, int64_t begin, const int32_t* words, int64_t len, A* acc);

template <>
void accumulate_any<float>(const at::Tensor& g, int64_t begin, const int32_t* words, int64_t len, float* acc) {
  switch (g.scalar_type()) {
    case at::kHalf:
      accumulate_f32_f16(g.const_data_ptr<c10::Half>() + begin, words, len, acc);
      break;
    case at::kBFloat16:
      accumulate_f32_bf16(g.const_data_ptr<c10::BFloat16>() + begin, words, len, acc);
      break;
    case at::kDouble:
      accumulate_f32_f64(g.const_data_ptr<double>() + begin, words, len, acc);
      break;
    default:
      accumulate_f32_f32(g.const_data_ptr<float>() + begin, words, len, acc);
  }
}

template <>
void accumulate_any<double>(const at::Tensor& g, int64_t begin, const int32_t* words, int64_t len, double* acc) {
  switch (g.scalar_type()) {
    case at::kHalf:
      accumulate_f64_f16(g.const_data_ptr<c10::Half>() + begin, words, len, acc);
      break;
    case at::kBFloat16:
      accumulate_f64_bf16(g.const_data_ptr<c10::BFloat16>() + begin, words, len, acc);
      break;
    case at::kDouble:
      accumulate_f64_f64(g.const_data_ptr<double>() + begin, words, len, acc);
      break;
    default:
      accumulate_f64_f32(g.const_data_ptr<float>() + begin, words, len, acc);
  }
}

}  // namespace

// The CPU kernel of torch.ops.fsmtl.masked_accumulate (schema in fsmtl_kernels/masked_accumulate.py):
// parameter i's bits start at word word_offsets[i] of row `task` of `words`. Any strides: a
// non-contiguous gradient is read through a contiguous copy, a non-contiguous acc is updated
// through a contiguous copy written back.
void masked_accumulate_cpu(at::TensorList acc, at::TensorList grads, const at::Tensor& words_in,
                           at::IntArrayRef word_offsets, int64_t task) {
  TORCH_CHECK(acc.size() == grads.size() && acc.size() == word_offsets.size(),
              "masked_accumulate: acc, grads and word_offsets must have the same length");
  TORCH_CHECK(words_in.device().is_cpu() && words_in.scalar_type() == at::kInt && words_in.dim() == 2,
              "masked_accumulate: words must be an int32 CPU tensor [T, W]");
  const at::Tensor words = words_in.contiguous();
  const int64_t n_words = words.size(1);
  TORCH_CHECK(task >= 0 && task < words.size(0), "masked_accumulate: task ", task, " is out of range");
  std::vector<int64_t> numels;
  std::vector<at::Tensor> grad;
  std::vector<at::Tensor> work;
  for (size_t i = 0; i < acc.size(); ++i) {
    const auto& a = acc[i];
    const auto& g = grads[i];
    TORCH_CHECK(a.device().is_cpu() && g.device().is_cpu(), "masked_accumulate: tensors must be on the CPU");
    const auto at_ = a.scalar_type();
    const auto gt = g.scalar_type();
    TORCH_CHECK(at_ == at::kFloat || at_ == at::kDouble, "masked_accumulate: acc[", i,
                "] must be float32 or float64");
    TORCH_CHECK(gt == at::kFloat || gt == at::kHalf || gt == at::kBFloat16 || gt == at::kDouble,
                "masked_accumulate: grads[", i, "] must be float64, float32, float16 or bfloat16");
    TORCH_CHECK(g.numel() == a.numel(), "masked_accumulate: grads[", i, "] must have acc[", i, "]'s size");
    TORCH_CHECK(word_offsets[i] >= 0 && word_offsets[i] + (a.numel() + 31) / 32 <= n_words,
                "masked_accumulate: word_offsets[", i, "] is out of range");
    numels.push_back(a.numel());
    grad.push_back(g.contiguous());
    work.push_back(a.is_contiguous() ? a : a.contiguous());
  }
  const auto blocks = make_blocks(numels, kAccumulateBlock);
  const int32_t* row = words.const_data_ptr<int32_t>() + task * n_words;
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const Block& blk = blocks[b];
      at::Tensor& a = work[blk.param];
      const int32_t* bw = row + word_offsets[blk.param] + blk.begin / 32;
      const int64_t len = blk.end - blk.begin;
      if (a.scalar_type() == at::kDouble) {
        accumulate_any<double>(grad[blk.param], blk.begin, bw, len, a.data_ptr<double>() + blk.begin);
      } else {
        accumulate_any<float>(grad[blk.param], blk.begin, bw, len, a.data_ptr<float>() + blk.begin);
      }
    }
  });
  for (size_t i = 0; i < acc.size(); ++i) {
    if (!work[i].is_same(acc[i])) acc[i].copy_(work[i]);
  }
}

}  // namespace fsmtl

TORCH_LIBRARY_IMPL(fsmtl, CPU, m) { m.impl("masked_accumulate", &fsmtl::masked_accumulate_cpu); }
