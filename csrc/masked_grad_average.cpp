// Masked multi-task gradient average on CPU (paper Eq. 4 / the shared update of Eq. 12):
//   out_i = sum_t S_ti * g_ti / T                  (normalize "tasks")
//   out_i = sum_t S_ti * g_ti / sum_t S_ti, 0 if none selected   (normalize "selected")
// in one pass over the entries: each block of entries reads the T gradient rows and the T mask
// words once and writes the output once, summing in float32.
//
// Bytes moved: T * P * sizeof(grad) + T * P / 8 (mask) read, P * sizeof(out) written.
// As in the reference, a masked-out entry contributes g * 0 (so an inf gradient gives NaN).
#include <torch/library.h>

#include "common.h"

namespace fsmtl {
namespace {

constexpr int64_t kAverageBlock = 2048;  // entries per block (64 mask words per task)

// acc[j] += g[j] * bit_j (and cnt[j] += bit_j when kCount) for one task's row over one block
// (len <= kAverageBlock; bit j of words[j / 32]). Branch-free so it vectorizes: the bit becomes a
// 0/1 float multiplier; full words run a fixed 32-entry loop.
template <bool kCount, typename G>
inline __attribute__((always_inline)) void add_word(const G* g, uint32_t word, int64_t n, float* acc, float* cnt) {
  for (int64_t j = 0; j < n; ++j) {
    const float bit = static_cast<float>((word >> j) & 1u);
    acc[j] += to_float(g[j]) * bit;
    if (kCount) cnt[j] += bit;
  }
}

template <bool kCount, typename G>
inline __attribute__((always_inline)) void add_task(const G* g, const int32_t* words, int64_t len, float* acc,
                                                    float* cnt) {
  const int64_t full = len / 32;
  for (int64_t w = 0; w < full; ++w) {
    add_word<kCount>(g + 32 * w, static_cast<uint32_t>(words[w]), 32, acc + 32 * w, cnt + 32 * w);
  }
  if (len > 32 * full) {
    add_word<kCount>(g + 32 * full, static_cast<uint32_t>(words[full]), len - 32 * full, acc + 32 * full,
                     cnt + 32 * full);
  }
}

FSMTL_MULTIVERSION
void add_task_float(const float* g, const int32_t* words, int64_t len, float* acc, float* cnt) {
  if (cnt != nullptr) {
    add_task<true>(g, words, len, acc, cnt);
  } else {
    add_task<false>(g, words, len, acc, cnt);
  }
}

FSMTL_MULTIVERSION
void add_task_bfloat16(const c10::BFloat16* g, const int32_t* words, int64_t len, float* acc, float* cnt) {
  if (cnt != nullptr) {
    add_task<true>(g, words, len, acc, cnt);
  } else {
    add_task<false>(g, words, len, acc, cnt);
  }
}

// fp16 rows are widened into an L1-resident float32 row first (vector conversion with F16C).
void add_task_half(const c10::Half* g, const int32_t* words, int64_t len, float* acc, float* cnt) {
  float row[kAverageBlock];
  half_to_float(g, row, len);
  add_task_float(row, words, len, acc, cnt);
}

inline void add_task_any(const float* g, const int32_t* w, int64_t len, float* acc, float* cnt) {
  add_task_float(g, w, len, acc, cnt);
}
inline void add_task_any(const c10::BFloat16* g, const int32_t* w, int64_t len, float* acc, float* cnt) {
  add_task_bfloat16(g, w, len, acc, cnt);
}
inline void add_task_any(const c10::Half* g, const int32_t* w, int64_t len, float* acc, float* cnt) {
  add_task_half(g, w, len, acc, cnt);
}

template <typename G, typename O>
void average_block(const G* grad, int64_t task_stride, int64_t tasks, const int32_t* words, int64_t word_stride,
                   int64_t len, bool selected, O* out) {
  float acc[kAverageBlock];
  float cnt[kAverageBlock];
  for (int64_t j = 0; j < len; ++j) acc[j] = 0.0f;
  if (selected) {
    for (int64_t j = 0; j < len; ++j) cnt[j] = 0.0f;
  }
  // The per-entry count is only needed to normalize by the selecting tasks.
  float* counts = selected ? cnt : nullptr;
  for (int64_t t = 0; t < tasks; ++t) add_task_any(grad + t * task_stride, words + t * word_stride, len, acc, counts);
  if (selected) {
    for (int64_t j = 0; j < len; ++j) out[j] = from_float<O>(cnt[j] > 0.0f ? acc[j] / cnt[j] : 0.0f);
  } else {
    const float num_tasks = static_cast<float>(tasks);
    for (int64_t j = 0; j < len; ++j) out[j] = from_float<O>(acc[j] / num_tasks);
  }
}

template <typename G>
void average_block_out(const G* grad, int64_t task_stride, int64_t tasks, const int32_t* words, int64_t word_stride,
                       int64_t len, bool selected, at::Tensor& out, int64_t begin) {
  switch (out.scalar_type()) {
    case at::kHalf:
      average_block(grad, task_stride, tasks, words, word_stride, len, selected, out.data_ptr<c10::Half>() + begin);
      break;
    case at::kBFloat16:
      average_block(grad, task_stride, tasks, words, word_stride, len, selected,
                    out.data_ptr<c10::BFloat16>() + begin);
      break;
    case at::kDouble:
      average_block(grad, task_stride, tasks, words, word_stride, len, selected, out.data_ptr<double>() + begin);
      break;
    default:
      average_block(grad, task_stride, tasks, words, word_stride, len, selected, out.data_ptr<float>() + begin);
  }
}

}  // namespace

// The CPU kernel of torch.ops.fsmtl.masked_grad_average (schema in fsmtl_kernels/masked_grad_average.py):
// parameter i's mask bits start at word word_offsets[i] of each task's row of `words`. Any strides:
// non-contiguous gradients are read through a contiguous copy, a non-contiguous output is written
// through a contiguous buffer copied back.
void masked_grad_average_cpu(at::TensorList grads, const at::Tensor& words_in, at::IntArrayRef word_offsets,
                             c10::string_view normalize, at::TensorList out) {
  TORCH_CHECK(normalize == "tasks" || normalize == "selected",
              "masked_grad_average: normalize must be \"tasks\" or \"selected\"");
  const bool selected = normalize == "selected";
  TORCH_CHECK(grads.size() == out.size() && grads.size() == word_offsets.size(),
              "masked_grad_average: grads, word_offsets and out must have the same length");
  TORCH_CHECK(words_in.device().is_cpu() && words_in.scalar_type() == at::kInt && words_in.dim() == 2,
              "masked_grad_average: words must be an int32 CPU tensor [T, W]");
  const at::Tensor words = words_in.contiguous();
  const int64_t tasks = words.size(0);
  const int64_t n_words = words.size(1);
  TORCH_CHECK(tasks > 0, "masked_grad_average: the mask has no task");
  std::vector<int64_t> numels;
  std::vector<at::Tensor> grad;
  std::vector<at::Tensor> work;
  for (size_t i = 0; i < grads.size(); ++i) {
    const auto& g = grads[i];
    const auto& o = out[i];
    TORCH_CHECK(g.device().is_cpu() && o.device().is_cpu(), "masked_grad_average: tensors must be on the CPU");
    const auto gt = g.scalar_type();
    const auto ot = o.scalar_type();
    TORCH_CHECK(gt == at::kFloat || gt == at::kHalf || gt == at::kBFloat16, "masked_grad_average: grads[", i,
                "] must be float32, float16 or bfloat16");
    TORCH_CHECK(ot == at::kFloat || ot == at::kHalf || ot == at::kBFloat16 || ot == at::kDouble,
                "masked_grad_average: out[", i, "] must be float64, float32, float16 or bfloat16");
    TORCH_CHECK(g.dim() >= 1 && g.size(0) == tasks && g.numel() == tasks * o.numel(), "masked_grad_average: grads[",
                i, "] must be [T, *out[", i, "].shape]");
    TORCH_CHECK(word_offsets[i] >= 0 && word_offsets[i] + (o.numel() + 31) / 32 <= n_words,
                "masked_grad_average: word_offsets[", i, "] is out of range");
    numels.push_back(o.numel());
    grad.push_back(g.contiguous());
    work.push_back(o.is_contiguous() ? o : at::empty(o.sizes(), o.options()));
  }
  const auto blocks = make_blocks(numels, kAverageBlock);
  const int32_t* w = words.const_data_ptr<int32_t>();
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const Block& blk = blocks[b];
      const at::Tensor& g = grad[blk.param];
      at::Tensor o = work[blk.param];
      const int64_t n = numels[blk.param];
      const int32_t* bw = w + word_offsets[blk.param] + blk.begin / 32;
      const int64_t len = blk.end - blk.begin;
      switch (g.scalar_type()) {
        case at::kHalf:
          average_block_out(g.const_data_ptr<c10::Half>() + blk.begin, n, tasks, bw, n_words, len, selected, o,
                            blk.begin);
          break;
        case at::kBFloat16:
          average_block_out(g.const_data_ptr<c10::BFloat16>() + blk.begin, n, tasks, bw, n_words, len, selected, o,
                            blk.begin);
          break;
        default:
          average_block_out(g.const_data_ptr<float>() + blk.begin, n, tasks, bw, n_words, len, selected, o,
                            blk.begin);
      }
    }
  });
  for (size_t i = 0; i < out.size(); ++i) {
    if (!work[i].is_same(out[i])) out[i].copy_(work[i]);
  }
}

}  // namespace fsmtl

TORCH_LIBRARY_IMPL(fsmtl, CPU, m) { m.impl("masked_grad_average", &fsmtl::masked_grad_average_cpu); }
