// The fused PG-DPO CPU op: input checks, per-pair math and registration as torch ops
// (pgdpo_cpu::forward, pgdpo_cpu::backward, pgdpo_cpu::build_info).
//
// Semantics and signatures follow the kernel contract of the op pgdpo::fused_loss (pgdpo/loss/op.py): inputs are [2B, N]
// contiguous (chosen rows first), loss and stats come back in the accumulation dtype (float64 for
// float64 inputs, float32 otherwise). The per-pair scalar math runs in float64 whatever the input
// dtype: it is O(B) work, and it keeps d_w, d_l, m and the backward coefficients as exact as the
// sums they come from.
#include "pgdpo_cpu.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#define PGDPO_STR2(x) #x
#define PGDPO_STR(x) PGDPO_STR2(x)
#ifndef PGDPO_CAPABILITY
#define PGDPO_CAPABILITY DEFAULT
#endif

// Read (as bytes, without loading the library) by pgdpo/loss/cpu_op.py to decide whether a prebuilt
// pgdpo._C suits this machine and this torch before its static op registration runs. The chunk
// size is there for tests that need inputs spanning several chunks.
extern "C" __attribute__((used, visibility("default"))) const char pgdpo_cpu_build_marker[] =
    "PGDPO_CPU_OP_BUILD capability=" PGDPO_STR(PGDPO_CAPABILITY) " torch=" TORCH_VERSION " chunk=" PGDPO_STR(
        PGDPO_CHUNK) ";";

namespace pgdpo_cpu {
namespace {

at::ScalarType acc_dtype(at::ScalarType s) {
  return s == at::kDouble ? at::kDouble : at::kFloat;
}

bool supported_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf;
}

void check_inputs(const char* fn, const at::Tensor& p, const at::Tensor& r, const at::Tensor& t) {
  const std::pair<const char*, const at::Tensor*> named[] = {{"pred", &p}, {"ref_pred", &r}, {"target", &t}};
  for (const auto& [name, x] : named) {
    TORCH_CHECK(x->defined(), fn, ": ", name, " is an undefined tensor");
    TORCH_CHECK(x->device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got one on ", x->device());
    TORCH_CHECK(x->dim() == 2, fn, ": ", name, " must be 2-D [2B, N], got shape ", x->sizes());
  }
  // Each input is read in its own dtype (fp32 / bf16 / fp16 in any mix); float64 is all-or-nothing.
  for (const auto& [name, x] : named) {
    TORCH_CHECK(supported_dtype(x->scalar_type()), fn, ": ", name,
                " must be float32, float64, bfloat16 or float16, got ", x->scalar_type());
    TORCH_CHECK((x->scalar_type() == at::kDouble) == (p.scalar_type() == at::kDouble), fn, ": ", name,
                " has dtype ", x->scalar_type(), " but pred has ", p.scalar_type(),
                "; float64 inputs must all be float64");
    TORCH_CHECK(x->sizes() == p.sizes(), fn, ": ", name, " has shape ", x->sizes(), " but pred has ", p.sizes());
    TORCH_CHECK(x->is_contiguous(), fn, ": ", name, " must be contiguous");
  }
  TORCH_CHECK(p.size(0) > 0 && p.size(0) % 2 == 0, fn,
              ": the first dimension must be 2B > 0 (B chosen rows, then B rejected rows), got ", p.size(0));
  TORCH_CHECK(p.size(1) > 0, fn, ": rows must have at least one element, got shape ", p.sizes());
}

// Per-row upstream gradient: grad_loss is [] (mean / sum) or [B] (reduction none).
std::vector<double> row_grads(const char* fn, const at::Tensor& grad_loss, int64_t pairs) {
  TORCH_CHECK(grad_loss.defined() && grad_loss.device().is_cpu() && grad_loss.is_floating_point(), fn,
              ": grad_loss must be a floating-point CPU tensor");
  TORCH_CHECK(grad_loss.dim() == 0 || (grad_loss.dim() == 1 && grad_loss.size(0) == pairs), fn,
              ": grad_loss must have shape [] or [", pairs, "], got ", grad_loss.sizes());
  const at::Tensor g = grad_loss.to(at::kDouble).contiguous();
  const double* gp = g.const_data_ptr<double>();
  std::vector<double> out(2 * pairs);
  for (int64_t row = 0; row < 2 * pairs; ++row) {
    out[row] = grad_loss.dim() == 0 ? gp[0] : gp[row % pairs];
  }
  return out;
}

void fill(at::Tensor& dst, const std::vector<double>& src) {
  if (dst.scalar_type() == at::kDouble) {
    std::copy(src.begin(), src.end(), dst.mutable_data_ptr<double>());
  } else {
    std::transform(src.begin(), src.end(), dst.mutable_data_ptr<float>(),
                   [](double v) { return static_cast<float>(v); });
  }
}

void sigmoid_pair(double x, double& pos, double& neg) {
  const double e = std::exp(-std::fabs(x));
  const double q = 1.0 / (1.0 + e);
  pos = x >= 0 ? q : e * q;
  neg = x >= 0 ? e * q : q;
}

struct SampleParams {
  double beta, k1, k2, eps;
  bool ars, ipr, anchor, detach;
  bool abs_margin;
  double eps_rel;
};

// One pair of sample weighting (docs/loss.md, docs/margin.md). dw, dl, anchor, ref_l: the per-pair
// means (ref_l = MSE of the reference on the rejected half). Writes the stats columns it owns and
// dL_b/d(dw), dL_b/d(dl), dL_b/d(anchor).
void sample_pair(const SampleParams& s, double dw, double dl, double anchor_mean, double ref_l, double* stats,
                 double& g_dw, double& g_dl, double& g_anchor) {
  const double e = s.eps + s.eps_rel * ref_l;
  const double inv = 1.0 / ((s.abs_margin ? std::fabs(dl) : dl) + e);
  const double m = s.abs_margin ? (dl - dw) * inv : (dw - dl) * inv;
  double alpha = 1, one_m_alpha = 0, gamma = 1, one_m_gamma = 0;
  if (s.ars) {
    sigmoid_pair(s.k1 * m, alpha, one_m_alpha);
  }
  if (s.ipr) {
    sigmoid_pair(s.k2 * m, one_m_gamma, gamma);
  }
  const double half_beta = 0.5 * s.beta;
  const double u = half_beta * (dw - alpha * dl);  // -z
  const double eu = std::exp(-std::fabs(u));
  const double dpo = std::max(u, 0.0) + std::log1p(eu);  // softplus(u)
  const double qu = 1.0 / (1.0 + eu);
  const double sig_u = u >= 0 ? qu : eu * qu;
  const double lipr = s.anchor ? anchor_mean : dw;
  const double per = gamma * dpo + one_m_gamma * lipr;

  stats[0] = dw;
  stats[1] = dl;
  stats[2] = m;
  stats[3] = alpha;
  stats[4] = gamma;
  stats[5] = dpo;
  stats[6] = lipr;
  stats[7] = per;

  const double gs = gamma * sig_u * half_beta;
  g_dw = s.anchor ? gs : gs + one_m_gamma;
  g_dl = -gs * alpha;
  g_anchor = s.anchor ? one_m_gamma : 0.0;
  if (!s.detach) {
    double gm = 0;
    if (s.ars) {
      gm -= gs * dl * s.k1 * alpha * one_m_alpha;
    }
    if (s.ipr) {
      gm -= (dpo - lipr) * s.k2 * gamma * one_m_gamma;
    }
    if (s.abs_margin) {
      // dm/d(dw) = -1/den, dm/d(dl) = (1 - m sign(dl)) / den with sign(0) = 0 (d|x|/dx at 0 := 0).
      const double sgn = dl > 0 ? 1.0 : (dl < 0 ? -1.0 : 0.0);
      g_dw -= gm * inv;
      g_dl += gm * (1.0 - m * sgn) * inv;
    } else {
      g_dw += gm * inv;
      g_dl -= gm * (dw + e) * inv * inv;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& pred, const at::Tensor& ref_pred,
                                                       const at::Tensor& target,
                                                       const std::optional<at::Tensor>& sample_weight, double beta,
                                                       double k1, double k2, double eps, bool ars, bool ipr,
                                                       bool anchor, bool element, bool detach, int64_t reduction,
                                                       bool need_grad, bool abs_margin, double eps_rel,
                                                       bool need_stats) {
  constexpr const char* fn = "pgdpo::fused_loss (CPU)";
  check_inputs(fn, pred, ref_pred, target);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, fn, ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
              reduction);
  const int64_t two_b = pred.size(0), pairs = two_b / 2, n = pred.size(1);
  const at::ScalarType acc = acc_dtype(pred.scalar_type());
  (void)need_stats;  // the CPU kernels always accumulate the statistics (cheap next to the loads on CPU)

  std::vector<double> weight(pairs, 1.0);
  if (sample_weight.has_value() && sample_weight->defined()) {
    const at::Tensor& w = *sample_weight;
    TORCH_CHECK(w.device().is_cpu(), fn, ": sample_weight must be a CPU tensor, got one on ", w.device());
    TORCH_CHECK(w.scalar_type() == acc, fn, ": sample_weight must have the accumulation dtype ", acc,
                " (float64 for float64 inputs, float32 otherwise), got ", w.scalar_type());
    TORCH_CHECK(w.dim() == 1 && w.size(0) == pairs, fn, ": sample_weight must have shape [", pairs,
                "] (one weight per pair), got ", w.sizes());
    TORCH_CHECK(w.is_contiguous(), fn, ": sample_weight must be contiguous");
    for (int64_t b = 0; b < pairs; ++b) {
      weight[b] = acc == at::kDouble ? w.const_data_ptr<double>()[b] : w.const_data_ptr<float>()[b];
    }
  }
  const double red_scale = reduction == 1 ? 1.0 / static_cast<double>(pairs) : 1.0;
  const double inv_n = 1.0 / static_cast<double>(n);
  const int64_t nc = num_chunks(n);
  const auto acc_opts = pred.options().dtype(acc);
  const auto f64_opts = pred.options().dtype(at::kDouble);

  std::vector<double> stats(pairs * kNumStats);
  std::vector<double> per(pairs);
  at::Tensor saved;
  if (!element) {
    at::Tensor partials = at::empty({two_b, nc, kNumSampleSums}, f64_opts);
    sample_partials(pred, ref_pred, target, partials);
    // Chunk partials in chunk order: the fixed reduction order behind bitwise determinism.
    std::vector<double> sums(two_b * kNumSampleSums, 0.0);
    const double* part = partials.const_data_ptr<double>();
    for (int64_t row = 0; row < two_b; ++row) {
      for (int64_t c = 0; c < nc; ++c) {
        for (int k = 0; k < kNumSampleSums; ++k) {
          sums[row * kNumSampleSums + k] += part[(row * nc + c) * kNumSampleSums + k];
        }
      }
    }
    const SampleParams prm{beta, k1, k2, eps, ars, ipr, anchor, detach, abs_margin, eps_rel};
    std::vector<double> coef(two_b * 2, 0.0);
    for (int64_t b = 0; b < pairs; ++b) {
      const double* sw = &sums[b * kNumSampleSums];
      const double* sl = &sums[(b + pairs) * kNumSampleSums];
      double* st = &stats[b * kNumStats];
      double g_dw, g_dl, g_anchor;
      sample_pair(prm, sw[kSumD] * inv_n, sl[kSumD] * inv_n, sw[kSumPR] * inv_n, sl[kSumRT] * inv_n, st, g_dw,
                  g_dl, g_anchor);
      per[b] = st[7];
      // d(mean_S f)/dp = f'/N, and d[(p-t)^2]/dp = 2(p-t), d[(p-r)^2]/dp = 2(p-r).
      const double scale = weight[b] * red_scale * 2.0 * inv_n;
      coef[b * 2] = scale * g_dw;
      coef[b * 2 + 1] = scale * g_anchor;
      coef[(b + pairs) * 2] = scale * g_dl;
      st[8] = sw[kSumPT] * inv_n;
      st[9] = sl[kSumPT] * inv_n;
      st[10] = sw[kSumRT] * inv_n;
      st[11] = sl[kSumRT] * inv_n;
    }
    saved = at::empty({two_b, 2}, acc_opts);
    fill(saved, coef);
  } else {
    std::vector<double> grad_coef(pairs);
    for (int64_t b = 0; b < pairs; ++b) {
      grad_coef[b] = weight[b] * red_scale * inv_n;
    }
    const ElementParams prm{beta, k1, k2, eps, ars, ipr, anchor, detach, abs_margin, eps_rel};
    at::Tensor partials = at::empty({pairs, nc, kNumElementSums}, f64_opts);
    // Saved in the accumulation dtype: a bf16 / fp16 gradient is rounded once, after the upstream scale.
    at::Tensor grad = need_grad ? at::empty({two_b, n}, acc_opts) : at::Tensor();
    element_forward(pred, ref_pred, target, prm, grad_coef.data(), partials, grad);
    saved = need_grad ? grad : at::empty({0}, acc_opts);
    const double* part = partials.const_data_ptr<double>();
    for (int64_t b = 0; b < pairs; ++b) {
      double sums[kNumElementSums] = {};
      for (int64_t c = 0; c < nc; ++c) {
        for (int k = 0; k < kNumElementSums; ++k) {
          sums[k] += part[(b * nc + c) * kNumElementSums + k];
        }
      }
      double* st = &stats[b * kNumStats];
      for (int k = 0; k < kNumElementSums; ++k) {  // ElementSum follows the STAT_NAMES order
        st[k] = sums[k] * inv_n;
      }
      per[b] = st[7];
    }
  }
  double total = 0;
  std::vector<double> loss_none(pairs);
  for (int64_t b = 0; b < pairs; ++b) {
    double* st = &stats[b * kNumStats];
    st[12] = -0.5 * beta * (st[0] - st[1]);  // reward margin
    st[13] = st[0] < st[1] ? 1.0 : 0.0;      // implicit accuracy
    loss_none[b] = weight[b] * per[b];
    total += loss_none[b];
  }
  at::Tensor stats_t = at::empty({pairs, kNumStats}, acc_opts);
  fill(stats_t, stats);
  at::Tensor loss;
  if (reduction == 0) {
    loss = at::empty({pairs}, acc_opts);
    fill(loss, loss_none);
  } else {
    loss = at::empty({}, acc_opts);
    fill(loss, {total * red_scale});
  }
  return {loss, stats_t, saved};
}

at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& pred, const at::Tensor& ref_pred,
                    const at::Tensor& target, const at::Tensor& saved, bool element,
                    std::optional<at::ScalarType> grad_dtype) {
  constexpr const char* fn = "pgdpo::fused_loss_backward (CPU)";
  if (element) {
    // `saved` is dloss/dpred itself (forward and backward fused); pred, ref_pred, target unused.
    TORCH_CHECK(saved.defined() && saved.device().is_cpu(), fn, ": saved must be a CPU tensor");
    TORCH_CHECK(saved.numel() > 0, fn,
                ": saved is empty: the forward ran with need_grad=False, so there is no gradient to scale");
    TORCH_CHECK(saved.dim() == 2 && saved.size(0) % 2 == 0 && saved.size(1) > 0, fn,
                ": saved must be the [2B, N] gradient of element weighting, got shape ", saved.sizes());
    TORCH_CHECK(saved.scalar_type() == at::kFloat || saved.scalar_type() == at::kDouble, fn,
                ": saved must be the float32 (float64) gradient of element weighting, got ", saved.scalar_type());
    TORCH_CHECK(saved.is_contiguous(), fn, ": saved must be contiguous");
    const at::ScalarType out_dtype = grad_dtype.value_or(saved.scalar_type());
    TORCH_CHECK(supported_dtype(out_dtype) && (out_dtype == at::kDouble) == (saved.scalar_type() == at::kDouble),
                fn, ": grad_dtype ", out_dtype, " does not suit a ", saved.scalar_type(), " saved gradient");
    const std::vector<double> g = row_grads(fn, grad_loss, saved.size(0) / 2);
    at::Tensor out = at::empty(saved.sizes(), saved.options().dtype(out_dtype));
    scale_rows(saved, g.data(), out);
    return out;
  }
  check_inputs(fn, pred, ref_pred, target);
  const int64_t two_b = pred.size(0);
  const at::ScalarType acc = acc_dtype(pred.scalar_type());
  TORCH_CHECK(saved.defined() && saved.device().is_cpu() && saved.scalar_type() == acc && saved.dim() == 2 &&
                  saved.size(0) == two_b && saved.size(1) == 2 && saved.is_contiguous(),
              fn, ": saved must be the contiguous [", two_b, ", 2] ", acc,
              " coefficients of sample weighting, got ", saved.sizes(), " ", saved.scalar_type());
  const std::vector<double> g = row_grads(fn, grad_loss, two_b / 2);
  std::vector<double> coef_t(two_b), coef_r(two_b);
  for (int64_t row = 0; row < two_b; ++row) {
    const double ct = acc == at::kDouble ? saved.const_data_ptr<double>()[row * 2] : saved.const_data_ptr<float>()[row * 2];
    const double cr =
        acc == at::kDouble ? saved.const_data_ptr<double>()[row * 2 + 1] : saved.const_data_ptr<float>()[row * 2 + 1];
    coef_t[row] = g[row] * ct;
    coef_r[row] = g[row] * cr;
  }
  TORCH_CHECK(!grad_dtype.has_value() || *grad_dtype == pred.scalar_type(), fn,
              ": sample weighting writes the gradient in pred's dtype ", pred.scalar_type(), ", got grad_dtype ",
              *grad_dtype);
  at::Tensor out = at::empty_like(pred);
  sample_backward(pred, ref_pred, target, coef_t.data(), coef_r.data(), out);
  return out;
}

// The CPU kernels of pgdpo::fused_loss / fused_loss_backward (schema: pgdpo/loss/op.py): the packed
// scalars and flags unpacked.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_loss(const at::Tensor& pred, const at::Tensor& ref_pred,
                                                          const at::Tensor& target,
                                                          const std::optional<at::Tensor>& sample_weight,
                                                          at::ArrayRef<double> scalars, int64_t flags) {
  TORCH_CHECK(static_cast<int64_t>(scalars.size()) == kNumScalars,
              "pgdpo::fused_loss: scalars must be [beta, k1, k2, eps, eps_rel], got ", scalars.size(), " values");
  return forward(pred, ref_pred, target, sample_weight, scalars[0], scalars[1], scalars[2], scalars[3],
                 flags & kFlagArs, flags & kFlagIpr, flags & kFlagAnchor, flags & kFlagElement, flags & kFlagDetach,
                 flags >> kReductionShift, flags & kFlagNeedGrad, flags & kFlagAbsMargin, scalars[4],
                 !(flags & kFlagNoStats));
}

at::Tensor fused_loss_backward(const at::Tensor& grad_loss, const at::Tensor& pred, const at::Tensor& ref_pred,
                               const at::Tensor& target, const at::Tensor& saved, bool element,
                               at::ScalarType grad_dtype) {
  return backward(grad_loss, pred, ref_pred, target, saved, element, grad_dtype);
}

std::string build_info() {
  return std::string(pgdpo_cpu_build_marker);
}

}  // namespace
}  // namespace pgdpo_cpu

// The schema of pgdpo::fused_loss is defined in Python (pgdpo/loss/op.py, with its fake kernel and autograd
// formula); this library provides its CPU kernels, plus the build marker.
TORCH_LIBRARY(pgdpo_cpu, m) {
  m.def("build_info() -> str", &pgdpo_cpu::build_info);
}

TORCH_LIBRARY_IMPL(pgdpo, CPU, m) {
  m.impl("fused_loss", &pgdpo_cpu::fused_loss);
  m.impl("fused_loss_backward", &pgdpo_cpu::fused_loss_backward);
}
