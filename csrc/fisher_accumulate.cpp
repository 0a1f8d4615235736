// Fisher accumulation on CPU: F_i += scale * sum_n g_in^2 (per-sample [N, *shape_i]) or
// F_i += scale * g_i^2 (batch), over every parameter in one parallel loop.
//
// Bytes moved: the gradients once (N * P * sizeof(grad)) plus the Fisher buffers read and
// written once (8 * P). No temporary the size of the gradients: each block of entries is
// accumulated in a stack buffer across the N sample rows, then added to F.
#include <torch/library.h>

#include "common.h"

namespace fsmtl {
namespace {

constexpr int64_t kFisherBlock = 1024;  // 4 KiB of float32 accumulators: stays in L1

// acc[j] += row[j]^2 over the `samples` rows, then fisher[j] += scale * acc[j]; len <= kFisherBlock.
template <typename T>
inline __attribute__((always_inline)) void accumulate_block(const T* grad, int64_t row_stride, int64_t samples,
                                                            float* fisher, int64_t len, float scale) {
  float acc[kFisherBlock];
  for (int64_t j = 0; j < len; ++j) acc[j] = 0.0f;
  for (int64_t s = 0; s < samples; ++s) {
    const T* row = grad + s * row_stride;
    for (int64_t j = 0; j < len; ++j) {
      const float v = to_float(row[j]);
      acc[j] += v * v;
    }
  }
  for (int64_t j = 0; j < len; ++j) fisher[j] += scale * acc[j];
}

FSMTL_MULTIVERSION
void accumulate_float(const float* grad, int64_t row_stride, int64_t samples, float* fisher, int64_t len,
                      float scale) {
  accumulate_block(grad, row_stride, samples, fisher, len, scale);
}

FSMTL_MULTIVERSION
void accumulate_bfloat16(const c10::BFloat16* grad, int64_t row_stride, int64_t samples, float* fisher, int64_t len,
                         float scale) {
  accumulate_block(grad, row_stride, samples, fisher, len, scale);
}

#ifdef FSMTL_X86
// fp16 with F16C: widen 8 entries per instruction and add their squares in the same loop (FMA).
__attribute__((target("avx2,fma,f16c"))) void accumulate_half_f16c(const c10::Half* grad, int64_t row_stride,
                                                                    int64_t samples, float* fisher, int64_t len,
                                                                    float scale) {
  alignas(32) float acc[kFisherBlock];
  const int64_t vec = len & ~int64_t{7};
  for (int64_t j = 0; j < len; ++j) acc[j] = 0.0f;
  for (int64_t s = 0; s < samples; ++s) {
    const c10::Half* row = grad + s * row_stride;
    for (int64_t j = 0; j < vec; j += 8) {
      const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j)));
      _mm256_store_ps(acc + j, _mm256_fmadd_ps(v, v, _mm256_load_ps(acc + j)));
    }
    for (int64_t j = vec; j < len; ++j) {
      const float v = static_cast<float>(row[j]);
      acc[j] += v * v;
    }
  }
  for (int64_t j = 0; j < len; ++j) fisher[j] += scale * acc[j];
}
#endif

// fp16 without F16C: c10::Half's scalar conversion.
void accumulate_half(const c10::Half* grad, int64_t row_stride, int64_t samples, float* fisher, int64_t len,
                     float scale) {
#ifdef FSMTL_X86
  if (cpu_has_f16c()) {
    accumulate_half_f16c(grad, row_stride, samples, fisher, len, scale);
    return;
  }
#endif
  accumulate_block(grad, row_stride, samples, fisher, len, scale);
}

}  // namespace

// The CPU kernel of torch.ops.fsmtl.fisher_accumulate (schema in fsmtl_kernels/fisher_accumulate.py).
// Any strides: non-contiguous gradients are read through a contiguous copy, and a non-contiguous
// Fisher buffer is updated through one that is copied back.
void fisher_accumulate_cpu(at::TensorList fisher, at::TensorList grads, double scale, bool per_sample) {
  TORCH_CHECK(fisher.size() == grads.size(), "fisher_accumulate: fisher has ", fisher.size(), " tensors but grads has ",
              grads.size());
  std::vector<int64_t> numels;
  std::vector<at::Tensor> work;
  std::vector<at::Tensor> grad;
  for (size_t i = 0; i < fisher.size(); ++i) {
    const auto& f = fisher[i];
    const auto& g = grads[i];
    TORCH_CHECK(f.device().is_cpu() && g.device().is_cpu(), "fisher_accumulate: tensors must be on the CPU");
    TORCH_CHECK(f.scalar_type() == at::kFloat, "fisher_accumulate: fisher[", i, "] must be float32");
    const auto st = g.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "fisher_accumulate: grads[", i,
                "] must be float32, float16 or bfloat16");
    const int64_t rows = per_sample ? (g.dim() > 0 ? g.size(0) : 0) : 1;
    TORCH_CHECK(g.numel() == rows * f.numel() && (!per_sample || g.dim() == f.dim() + 1),
                "fisher_accumulate: grads[", i, "] does not match fisher[", i, "]");
    numels.push_back(f.numel());
    work.push_back(f.contiguous());
    grad.push_back(g.contiguous());
  }
  const auto blocks = make_blocks(numels, kFisherBlock);
  const float scale_f = static_cast<float>(scale);
  // Each block touches only its own Fisher entries, so blocks run in any order on any thread.
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const Block& blk = blocks[b];
      const at::Tensor& g = grad[blk.param];
      const int64_t n = numels[blk.param];
      const int64_t samples = per_sample ? g.size(0) : 1;
      float* f = work[blk.param].data_ptr<float>() + blk.begin;
      const int64_t len = blk.end - blk.begin;
      switch (g.scalar_type()) {
        case at::kHalf:
          accumulate_half(g.const_data_ptr<c10::Half>() + blk.begin, n, samples, f, len, scale_f);
          break;
        case at::kBFloat16:
          accumulate_bfloat16(g.const_data_ptr<c10::BFloat16>() + blk.begin, n, samples, f, len, scale_f);
          break;
        default:
          accumulate_float(g.const_data_ptr<float>() + blk.begin, n, samples, f, len, scale_f);
      }
    }
  });
  for (size_t i = 0; i < fisher.size(); ++i) {
    if (!work[i].is_same(fisher[i])) fisher[i].copy_(work[i]);
  }
}

}  // namespace fsmtl

TORCH_LIBRARY_IMPL(fsmtl, CPU, m) { m.impl("fisher_accumulate", &fsmtl::fisher_accumulate_cpu); }
