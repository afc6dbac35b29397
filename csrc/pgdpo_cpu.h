// Fused PG-DPO loss on CPU: declarations shared by the op layer (pgdpo_cpu_ops.cpp) and the
// vectorised kernels (pgdpo_cpu_kernels.cpp). The formulas are those of docs/loss.md; the
// interface is the kernel contract of the op pgdpo::fused_loss (pgdpo/loss/op.py).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace pgdpo_cpu {

constexpr int64_t kNumStats = 14;  // pgdpo.loss.options.STAT_NAMES

// Bits of the op's `flags` argument and the shift of its reduction code: pgdpo/loss/op.py's ARS, IPR, ...
// (tests/test_cpu_op.py checks the two lists agree).
constexpr int64_t kFlagArs = 1, kFlagIpr = 2, kFlagAnchor = 4, kFlagElement = 8, kFlagDetach = 16,
                  kFlagNeedGrad = 32, kFlagAbsMargin = 64, kFlagNoStats = 128;
constexpr int64_t kReductionShift = 8;
constexpr int64_t kNumScalars = 5;  // beta, k1, k2, eps, eps_rel

// Elements of one row per reduction chunk. Every reduction first sums fixed chunks into partials
// and then adds the partials in chunk order; the chunk size never depends on the thread count, so
// every output bit is the same for any number of threads. 4096 keeps a task's working set (three
// inputs, two rows in element mode, plus the gradient) well inside L2 and bounds the number of fp32
// terms summed per vector lane before the fp64 combination to 4096 / lanes.
#define PGDPO_CHUNK 4096
constexpr int64_t kChunk = PGDPO_CHUNK;

// Per-chunk sums of sample weighting, per row: sum (p-r)(p+r-2t), sum (p-t)^2, sum (r-t)^2,
// sum (p-r)^2.
enum SampleSum : int { kSumD = 0, kSumPT, kSumRT, kSumPR, kNumSampleSums };

// Per-chunk sums of element weighting, per pair, in the order of STAT_NAMES where they overlap.
enum ElementSum : int {
  kESumDw = 0,
  kESumDl,
  kESumM,
  kESumAlpha,
  kESumGamma,
  kESumDpo,
  kESumIpr,
  kESumLoss,
  kESumPTw,  // (p_w - t_w)^2
  kESumPTl,
  kESumRTw,
  kESumRTl,
  kNumElementSums
};

struct ElementParams {
  double beta, k1, k2, eps;
  bool ars, ipr, anchor, detach;
  bool abs_margin;  // m = (d_l - d_w) / (|d_l| + e) instead of (d_w - d_l) / (d_l + e)
  double eps_rel;   // e = eps + eps_rel * (r_l - t_l)^2
};

inline int64_t num_chunks(int64_t n) {
  return (n + kChunk - 1) / kChunk;
}

// partials: [rows, num_chunks(n), kNumSampleSums] float64.
void sample_partials(const at::Tensor& p, const at::Tensor& r, const at::Tensor& t, at::Tensor& partials);

// Inputs p, r, t: [2B, n], each in its own dtype (float / BFloat16 / Half, any mix), or all double.

// Element weighting, forward and (when `grad` is defined) the gradient in one pass.
// partials: [B, num_chunks(n), kNumElementSums] float64. grad_coef[b] = dloss/dL_b / N (sample
// weight and the 1/B of mean included). grad: [2B, n] in the accumulation dtype (float, or double
// for double inputs: rounded to pred's dtype once, by scale_rows), or undefined.
void element_forward(const at::Tensor& p, const at::Tensor& r, const at::Tensor& t, const ElementParams& prm,
                     const double* grad_coef, at::Tensor& partials, at::Tensor& grad);

// grad[row] = coef_t[row] * (p - t) + coef_r[row] * (p - r) in p's dtype; r is not read on rows where
// coef_r is 0.
void sample_backward(const at::Tensor& p, const at::Tensor& r, const at::Tensor& t, const double* coef_t,
                     const double* coef_r, at::Tensor& grad);

// out[row] = scale[row] * saved[row]; saved float (or double), out in any supported dtype.
void scale_rows(const at::Tensor& saved, const double* scale, at::Tensor& out);

}  // namespace pgdpo_cpu
