// k tasks' masked Linear weight gradients added into a running sum on CPU:
//   acc[o, i] += sum_{j < k} S_{first_task + j}[o, i] * (a[j] @ b)[o, i]
// The product is computed in acc's dtype (a and b upcast once when they differ), multiplied by the
// 0/1 mask bit (exact; a masked-out inf or NaN gives NaN) and added: the reference's semantics
// (fsmtl_kernels/reference/masked_matmul_accumulate.py), up to the GEMM's summation order.
//
// Cache: acc is walked in blocks of rb rows (rb * in * sizeof(acc) about 256 KiB); for each block,
// every task's product rows go through one preallocated scratch [rb, in] (at::mm_out, MKL/BLAS
// threads inside) and are added into the block while it is still in cache, so acc is read and
// written once per call instead of once per task.
#include <torch/library.h>

#include "common.h"

namespace fsmtl {
namespace {

constexpr int64_t kBlockBytes = 256 * 1024;

// acc[e] += prod[e] * bit(e) for the len flat entries starting at flat index `first` of the
// weight; bit(e) is bit e % 32 of words[e / 32] (words indexed from the weight's first word).
// Branch-free: full words run a fixed 32-entry loop that vectorizes.
template <typename A>
inline __attribute__((always_inline)) void masked_add(const A* prod, const int32_t* words, int64_t first, int64_t len,
                                                      A* acc) {
  int64_t e = 0;
  // Head: entries up to the next word boundary.
  while (e < len && (first + e) % 32 != 0) {
    const int64_t f = first + e;
    const A bit = static_cast<A>((static_cast<uint32_t>(words[f / 32]) >> (f % 32)) & 1u);
    acc[e] += prod[e] * bit;
    ++e;
  }
  for (; e + 32 <= len; e += 32) {
    const uint32_t word = static_cast<uint32_t>(words[(first + e) / 32]);
    for (int64_t j = 0; j < 32; ++j) {
      const A bit = static_cast<A>((word >> j) & 1u);
      acc[e + j] += prod[e + j] * bit;
    }
  }
  for (; e < len; ++e) {
    const int64_t f = first + e;
    const A bit = static_cast<A>((static_cast<uint32_t>(words[f / 32]) >> (f % 32)) & 1u);
    acc[e] += prod[e] * bit;
  }
}

FSMTL_MULTIVERSION
void masked_add_f32(const float* prod, const int32_t* words, int64_t first, int64_t len, float* acc) {
  masked_add<float>(prod, words, first, len, acc);
}

FSMTL_MULTIVERSION
void masked_add_f64(const double* prod, const int32_t* words, int64_t first, int64_t len, double* acc) {
  masked_add<double>(prod, words, first, len, acc);
}

}  // namespace

// The CPU kernel of torch.ops.fsmtl.masked_matmul_accumulate (schema in
// fsmtl_kernels/masked_matmul_accumulate.py): task first_task + j's bits of the weight start at
// word word_offset of row first_task + j of `words`. acc must be contiguous; a and b any strides.
void masked_matmul_accumulate_cpu(const at::Tensor& acc, const at::Tensor& a_in, const at::Tensor& b_in,
                                  const at::Tensor& words_in, int64_t word_offset, int64_t first_task) {
  TORCH_CHECK(acc.device().is_cpu() && a_in.device().is_cpu() && b_in.device().is_cpu(),
              "masked_matmul_accumulate: tensors must be on the CPU");
  const auto dtype = acc.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "masked_matmul_accumulate: acc must be float32 or float64");
  TORCH_CHECK(acc.dim() == 2 && acc.is_contiguous(), "masked_matmul_accumulate: acc must be a contiguous [out, in]");
  TORCH_CHECK(a_in.scalar_type() == at::kFloat || a_in.scalar_type() == at::kDouble,
              "masked_matmul_accumulate: a must be float32 or float64");
  TORCH_CHECK(b_in.scalar_type() == a_in.scalar_type(), "masked_matmul_accumulate: b must have a's dtype");
  const int64_t out = acc.size(0);
  const int64_t in = acc.size(1);
  TORCH_CHECK(a_in.dim() == 3 && a_in.size(1) == out, "masked_matmul_accumulate: a must be [k, out, n]");
  TORCH_CHECK(b_in.dim() == 2 && b_in.size(0) == a_in.size(2) && b_in.size(1) == in,
              "masked_matmul_accumulate: b must be [n, in]");
  TORCH_CHECK(words_in.device().is_cpu() && words_in.scalar_type() == at::kInt && words_in.dim() == 2,
              "masked_matmul_accumulate: words must be an int32 CPU tensor [T, W]");
  const int64_t k = a_in.size(0);
  const int64_t numel = out * in;
  TORCH_CHECK(first_task >= 0 && first_task + k <= words_in.size(0),
              "masked_matmul_accumulate: first_task ", first_task, " is out of range");
  TORCH_CHECK(word_offset >= 0 && word_offset + (numel + 31) / 32 <= words_in.size(1),
              "masked_matmul_accumulate: word_offset ", word_offset, " is out of range");
  if (numel == 0 || k == 0) return;
  const at::Tensor words = words_in.contiguous();
  const int64_t n_words = words.size(1);
  const at::Tensor a = a_in.scalar_type() == dtype ? a_in : a_in.to(dtype);
  const at::Tensor b = b_in.scalar_type() == dtype ? b_in : b_in.to(dtype);
  const int64_t rb = std::max<int64_t>(1, std::min<int64_t>(out, kBlockBytes / (in * acc.element_size())));
  at::Tensor scratch = at::empty({rb, in}, acc.options());
  const int32_t* w0 = words.const_data_ptr<int32_t>() + first_task * n_words + word_offset;
  for (int64_t r0 = 0; r0 < out; r0 += rb) {
    const int64_t rows = std::min(rb, out - r0);
    at::Tensor prod = rows == rb ? scratch : scratch.narrow(0, 0, rows);
    const int64_t first = r0 * in;
    const int64_t len = rows * in;
    for (int64_t j = 0; j < k; ++j) {
      at::mm_out(prod, a[j].narrow(0, r0, rows), b);
      const int32_t* wj = w0 + j * n_words;
      if (dtype == at::kDouble) {
        masked_add_f64(prod.const_data_ptr<double>(), wj, first, len, acc.data_ptr<double>() + first);
      } else {
        masked_add_f32(prod.const_data_ptr<float>(), wj, first, len, acc.data_ptr<float>() + first);
      }
    }
  }
}

}  // namespace fsmtl

TORCH_LIBRARY_IMPL(fsmtl, CPU, m) { m.impl("masked_matmul_accumulate", &fsmtl::masked_matmul_accumulate_cpu); }
