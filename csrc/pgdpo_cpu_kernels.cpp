// Vectorised, thread-parallel kernels of the fused PG-DPO CPU op (see pgdpo_cpu.h).
//
// Work is split into tasks of (row or pair, chunk of kChunk elements). Each task writes its own
// partial sums, which the op layer adds in chunk order, so results do not depend on how
// at::parallel_for hands tasks to threads. Inside a task the arithmetic runs on at::vec::Vectorized
// of the accumulation type (float, or double for double inputs); bf16 / fp16 inputs are widened
// with at::vec's converters. The instruction set is whatever CPU_CAPABILITY the file is compiled
// for (pgdpo/loss/cpu_op.py picks it and keys the build cache on it).
#include "pgdpo_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

namespace pgdpo_cpu {
namespace {

using at::vec::Vectorized;

// Tasks below which at::parallel_for runs inline: forking threads costs more than a few chunks of
// streaming work. Only the speed depends on these, never the results.
constexpr int64_t kStreamGrain = 8;
constexpr int64_t kElementGrain = 2;

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The unit of the inner loops: two vectors of the accumulation type, i.e. exactly one
// Vectorized<BFloat16/Half>, so reduced-precision loads and stores convert whole registers. Loads
// and stores are templated on the element type of each tensor: pred, ref_pred and target are each
// read in their own dtype (no promotion copies), and the gradient is written in its own.
template <typename acc_t_>
struct Step {
  using acc_t = acc_t_;
  using V = Vectorized<acc_t>;
  static constexpr int64_t kW = V::size();
  static constexpr int64_t kSize = 2 * kW;
  static_assert(kChunk % kSize == 0, "chunks must hold whole steps so that only a row's last step is partial");

  // Loads `count` <= kSize elements; missing ones read as zero.
  template <typename T>
  static inline void load(const T* ptr, int64_t count, V& lo, V& hi) {
    constexpr bool kSame = std::is_same_v<T, acc_t>;
    static_assert(kSame || Vectorized<T>::size() == kSize, "unexpected reduced-precision vector width");
    if (count == kSize) {
      if constexpr (kSame) {
        lo = V::loadu(ptr);
        hi = V::loadu(ptr + kW);
      } else {
        std::tie(lo, hi) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(ptr));
      }
      return;
    }
    __at_align__ acc_t buf[kSize];
    for (int64_t i = 0; i < kSize; ++i) {
      buf[i] = i < count ? static_cast<acc_t>(ptr[i]) : acc_t(0);
    }
    lo = V::loadu(buf);
    hi = V::loadu(buf + kW);
  }

  template <typename T>
  static inline void store(T* ptr, int64_t count, const V& lo, const V& hi) {
    constexpr bool kSame = std::is_same_v<T, acc_t>;
    if (count == kSize) {
      if constexpr (kSame) {
        lo.store(ptr);
        hi.store(ptr + kW);
      } else {
        at::vec::convert_from_float<T>(lo, hi).store(ptr);
      }
      return;
    }
    __at_align__ acc_t buf[kSize];
    lo.store(buf);
    hi.store(buf + kW);
    for (int64_t i = 0; i < count; ++i) {
      ptr[i] = static_cast<T>(buf[i]);
    }
  }
};

// Lanes are added in double, in lane order: cheap (once per chunk) and fixed.
template <typename V>
inline double lane_sum(const V& v) {
  __at_align__ typename V::value_type buf[V::size()];
  v.store(buf);
  double s = 0;
  for (int64_t i = 0; i < V::size(); ++i) {
    s += static_cast<double>(buf[i]);
  }
  return s;
}

template <typename acc_t, typename P, typename R, typename T>
void sample_partials_impl(const P* p, const R* r, const T* t, int64_t rows, int64_t n, double* out) {
  using S = Step<acc_t>;
  using V = typename S::V;
  const int64_t nc = num_chunks(n);
  at::parallel_for(0, rows * nc, kStreamGrain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / nc;
      const int64_t lo = (task % nc) * kChunk;
      const int64_t hi = std::min(n, lo + kChunk);
      const P* pr = p + row * n;
      const R* rr = r + row * n;
      const T* tr = t + row * n;
      // Two accumulators per sum (one per half-step) keep the FMA chains independent.
      V sd0(0), sd1(0), spt0(0), spt1(0), srt0(0), srt1(0), spr0(0), spr1(0);
      for (int64_t j = lo; j < hi; j += S::kSize) {
        const int64_t cnt = std::min(S::kSize, hi - j);
        V p0, p1, r0, r1, t0, t1;
        S::load(pr + j, cnt, p0, p1);
        S::load(rr + j, cnt, r0, r1);
        S::load(tr + j, cnt, t0, t1);
        // (p-t)^2 - (r-t)^2 = (p-r)(p+r-2t): no cancellation between two nearly equal sums.
        const V d0 = p0 - r0, e0 = p0 - t0, f0 = r0 - t0;
        const V d1 = p1 - r1, e1 = p1 - t1, f1 = r1 - t1;
        sd0 = at::vec::fmadd(d0, e0 + f0, sd0);
        sd1 = at::vec::fmadd(d1, e1 + f1, sd1);
        spt0 = at::vec::fmadd(e0, e0, spt0);
        spt1 = at::vec::fmadd(e1, e1, spt1);
        srt0 = at::vec::fmadd(f0, f0, srt0);
        srt1 = at::vec::fmadd(f1, f1, srt1);
        spr0 = at::vec::fmadd(d0, d0, spr0);
        spr1 = at::vec::fmadd(d1, d1, spr1);
      }
      double* o = out + task * kNumSampleSums;
      o[kSumD] = lane_sum(sd0 + sd1);
      o[kSumPT] = lane_sum(spt0 + spt1);
      o[kSumRT] = lane_sum(srt0 + srt1);
      o[kSumPR] = lane_sum(spr0 + spr1);
    }
  });
}

// exp(-|x|), NaN for NaN. For float, at::vec's inlined exp_u20 (error <= 20 ulp, ~2e-6 relative, far
// below what the fp32 sums of these terms resolve) instead of Sleef's exp: a call clobbers every vector
// register of this register-hungry loop; with the forced inlining below it made the element kernel
// ~1.7x faster. exp_u20 saturates instead of propagating NaN, hence the blend.
template <typename V>
inline V exp_neg_abs(const V& x) {
  if constexpr (std::is_same_v<typename V::value_type, float>) {
    return V::blendv(x.abs().neg().exp_u20(), x, x.isnan());
  } else {
    return x.abs().neg().exp();
  }
}

template <typename acc_t, typename P, typename R, typename T>
void element_forward_impl(const P* p, const R* r, const T* t, int64_t pairs, int64_t n, const ElementParams& prm,
                          const double* grad_coef, double* out, acc_t* grad) {
  using S = Step<acc_t>;
  using V = typename S::V;
  const V zero(0), one(1);
  const V half_beta(static_cast<acc_t>(0.5 * prm.beta));
  const V k1(static_cast<acc_t>(prm.k1)), k2(static_cast<acc_t>(prm.k2)), eps(static_cast<acc_t>(prm.eps));
  const V eps_rel(static_cast<acc_t>(prm.eps_rel));
  const bool ars = prm.ars, ipr = prm.ipr, anchor = prm.anchor, detach = prm.detach;
  const bool abs_margin = prm.abs_margin, relative = prm.eps_rel != 0.0;
  // With k1 == k2 (the paper's default) gamma = sigmoid(-k m) = 1 - alpha: one exp and one division
  // per element fewer, and bitwise the same values as computing both.
  const bool shared_sigmoid = ars && ipr && prm.k1 == prm.k2;
  const int64_t nc = num_chunks(n);

  // sigmoid(x) and sigmoid(-x) = 1 - sigmoid(x) from one exp(-|x|): no overflow, and the small one
  // keeps its relative precision instead of being 1 minus something close to 1.
  auto sigmoid_pair = [&](const V& x, V& pos, V& neg) __attribute__((always_inline)) {
    const V e = exp_neg_abs(x);
    const V q = one / (one + e);
    const V eq = e * q;
    const V nonneg = x >= zero;
    pos = V::blendv(eq, q, nonneg);
    neg = V::blendv(q, eq, nonneg);
  };

  at::parallel_for(0, pairs * nc, kElementGrain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nc;
      const int64_t lo = (task % nc) * kChunk;
      const int64_t hi = std::min(n, lo + kChunk);
      const int64_t w_off = b * n, l_off = (b + pairs) * n;
      const V coef2(static_cast<acc_t>(2.0 * grad_coef[b]));
      V acc[kNumElementSums];
      for (auto& a : acc) {
        a = zero;
      }

      // One vector of elements; `valid` < kW only in a row's last step, whose padding lanes must not
      // reach the sums (a zero-padded lane still has, e.g., alpha = 0.5). Forced inline (GCC / Clang)
      // so that the 12 accumulators and the constants stay in registers.
      auto body = [&](const V& pw, const V& rw, const V& tw, const V& pl, const V& rl, const V& tl,
                      int64_t valid, V& gw, V& gl) __attribute__((always_inline)) {
        const V dpr = pw - rw, ew = pw - tw, fw = rw - tw;
        const V el = pl - tl, fl = rl - tl;
        const V dw = dpr * (ew + fw);
        const V dl = (pl - rl) * (el + fl);
        // Denominator guard e = eps + eps_rel (r_l - t_l)^2 (docs/margin.md); "abs": m = (dl - dw) / (|dl| + e).
        const V e = relative ? at::vec::fmadd(eps_rel, fl * fl, eps) : eps;
        const V inv = one / ((abs_margin ? dl.abs() : dl) + e);
        const V m = abs_margin ? (dl - dw) * inv : (dw - dl) * inv;
        V alpha = one, one_m_alpha = zero, gamma = one, one_m_gamma = zero;
        if (shared_sigmoid) {
          sigmoid_pair(k1 * m, alpha, one_m_alpha);
          gamma = one_m_alpha;
          one_m_gamma = alpha;
        } else {
          if (ars) {
            sigmoid_pair(k1 * m, alpha, one_m_alpha);
          }
          if (ipr) {
            sigmoid_pair(k2 * m, one_m_gamma, gamma);
          }
        }
        const V u = half_beta * (dw - alpha * dl);  // -z
        const V eu = exp_neg_abs(u);
        const V dpo = at::vec::maximum(u, zero) + eu.log1p();  // softplus(u), stable
        const V qu = one / (one + eu);
        const V sig_u = V::blendv(eu * qu, qu, u >= zero);  // softplus'(u)
        const V lipr = anchor ? dpr * dpr : dw;
        const V per = gamma * dpo + one_m_gamma * lipr;
        const V terms[kNumElementSums] = {dw,  dl,  m,       alpha,   gamma,   dpo,
                                          lipr, per, ew * ew, el * el, fw * fw, fl * fl};
        if (valid >= S::kW) {
          for (int k = 0; k < kNumElementSums; ++k) {
            acc[k] = acc[k] + terms[k];
          }
        } else {
          for (int k = 0; k < kNumElementSums; ++k) {
            acc[k] = acc[k] + V::set(zero, terms[k], valid);
          }
        }
        if (grad == nullptr) {
          return;
        }
        const V gs = gamma * sig_u * half_beta;  // dL/d(dw) through the DPO term
        V g_dw = anchor ? gs : gs + one_m_gamma;
        V g_dl = (gs * alpha).neg();
        if (!detach) {
          // Through m: alpha and gamma are functions of m = (dw - dl) / (dl + eps).
          V gm = zero;
          if (ars) {
            gm = gm - gs * dl * k1 * alpha * one_m_alpha;
          }
          if (ipr) {
            gm = gm - (dpo - lipr) * k2 * gamma * one_m_gamma;
          }
          if (abs_margin) {
            // dm/d(dw) = -1/den, dm/d(dl) = (1 - m sign(dl)) / den, sign(0) = 0 (d|x|/dx at 0 := 0).
            const V sgn = V::blendv(zero, one, dl > zero) - V::blendv(zero, one, dl < zero);
            g_dw = g_dw - gm * inv;
            g_dl = g_dl + gm * (one - m * sgn) * inv;
          } else {
            g_dw = g_dw + gm * inv;
            g_dl = g_dl - gm * (dw + e) * inv * inv;
          }
        }
        gw = anchor ? coef2 * (g_dw * ew + one_m_gamma * dpr) : coef2 * (g_dw * ew);
        gl = coef2 * (g_dl * el);
      };

      for (int64_t j = lo; j < hi; j += S::kSize) {
        const int64_t cnt = std::min(S::kSize, hi - j);
        V pw0, pw1, rw0, rw1, tw0, tw1, pl0, pl1, rl0, rl1, tl0, tl1;
        S::load(p + w_off + j, cnt, pw0, pw1);
        S::load(r + w_off + j, cnt, rw0, rw1);
        S::load(t + w_off + j, cnt, tw0, tw1);
        S::load(p + l_off + j, cnt, pl0, pl1);
        S::load(r + l_off + j, cnt, rl0, rl1);
        S::load(t + l_off + j, cnt, tl0, tl1);
        V gw0 = zero, gw1 = zero, gl0 = zero, gl1 = zero;
        body(pw0, rw0, tw0, pl0, rl0, tl0, std::min(cnt, S::kW), gw0, gl0);
        body(pw1, rw1, tw1, pl1, rl1, tl1, std::max<int64_t>(cnt - S::kW, 0), gw1, gl1);
        if (grad != nullptr) {
          S::store(grad + w_off + j, cnt, gw0, gw1);
          S::store(grad + l_off + j, cnt, gl0, gl1);
        }
      }
      double* o = out + task * kNumElementSums;
      for (int k = 0; k < kNumElementSums; ++k) {
        o[k] = lane_sum(acc[k]);
      }
    }
  });
}

template <typename acc_t, typename P, typename R, typename T>
void sample_backward_impl(const P* p, const R* r, const T* t, int64_t rows, int64_t n, const double* coef_t,
                          const double* coef_r, P* grad) {
  using S = Step<acc_t>;
  using V = typename S::V;
  const int64_t nc = num_chunks(n);
  at::parallel_for(0, rows * nc, kStreamGrain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / nc;
      const int64_t lo = (task % nc) * kChunk;
      const int64_t hi = std::min(n, lo + kChunk);
      const int64_t off = row * n;
      const V a(static_cast<acc_t>(coef_t[row]));
      const V c(static_cast<acc_t>(coef_r[row]));
      // Rejected rows (and chosen rows without the anchor term) never touch ref_pred: a third less
      // memory traffic there.
      const bool use_r = coef_r[row] != 0.0;
      for (int64_t j = lo; j < hi; j += S::kSize) {
        const int64_t cnt = std::min(S::kSize, hi - j);
        V p0, p1, t0, t1;
        S::load(p + off + j, cnt, p0, p1);
        S::load(t + off + j, cnt, t0, t1);
        V g0 = a * (p0 - t0), g1 = a * (p1 - t1);
        if (use_r) {
          V r0, r1;
          S::load(r + off + j, cnt, r0, r1);
          g0 = at::vec::fmadd(c, p0 - r0, g0);
          g1 = at::vec::fmadd(c, p1 - r1, g1);
        }
        S::store(grad + off + j, cnt, g0, g1);
      }
    }
  });
}

template <typename acc_t, typename G>
void scale_rows_impl(const acc_t* saved, int64_t rows, int64_t n, const double* scale, G* out) {
  using S = Step<acc_t>;
  using V = typename S::V;
  const int64_t nc = num_chunks(n);
  at::parallel_for(0, rows * nc, kStreamGrain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / nc;
      const int64_t lo = (task % nc) * kChunk;
      const int64_t hi = std::min(n, lo + kChunk);
      const int64_t off = row * n;
      const V s(static_cast<acc_t>(scale[row]));
      for (int64_t j = lo; j < hi; j += S::kSize) {
        const int64_t cnt = std::min(S::kSize, hi - j);
        V x0, x1;
        S::load(saved + off + j, cnt, x0, x1);
        S::store(out + off + j, cnt, s * x0, s * x1);
      }
    }
  });
}

}  // namespace

namespace {

// Calls f(P{}, R{}, T{}) with the element types of p, r, t: any mix of float / BFloat16 / Half, or
// all double (the op layer checks that float64 is all-or-nothing).
template <typename F>
void dispatch_low(at::ScalarType s, const char* what, F&& f) {
  switch (s) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, "pgdpo_cpu: ", what, " has unsupported dtype ", s);
  }
}

template <typename F>
void dispatch3(const at::Tensor& p, const at::Tensor& r, const at::Tensor& t, F&& f) {
  if (p.scalar_type() == at::kDouble) {
    TORCH_CHECK(r.scalar_type() == at::kDouble && t.scalar_type() == at::kDouble,
                "pgdpo_cpu: float64 inputs must all be float64");
    f(double{}, double{}, double{});
    return;
  }
  dispatch_low(p.scalar_type(), "pred", [&](auto pv) {
    dispatch_low(r.scalar_type(), "ref_pred", [&](auto rv) {
      dispatch_low(t.scalar_type(), "target", [&](auto tv) { f(pv, rv, tv); });
    });
  });
}

template <typename P>
using acc_of = acc_type_t<P>;

}  // namespace

void sample_partials(const at::Tensor& p, const at::Tensor& r, const at::Tensor& t, at::Tensor& partials) {
  dispatch3(p, r, t, [&](auto pv, auto rv, auto tv) {
    using P = decltype(pv);
    using R = decltype(rv);
    using T = decltype(tv);
    sample_partials_impl<acc_of<P>>(p.const_data_ptr<P>(), r.const_data_ptr<R>(), t.const_data_ptr<T>(),
                                    p.size(0), p.size(1), partials.mutable_data_ptr<double>());
  });
}

void element_forward(const at::Tensor& p, const at::Tensor& r, const at::Tensor& t, const ElementParams& prm,
                     const double* grad_coef, at::Tensor& partials, at::Tensor& grad) {
  dispatch3(p, r, t, [&](auto pv, auto rv, auto tv) {
    using P = decltype(pv);
    using R = decltype(rv);
    using T = decltype(tv);
    using A = acc_of<P>;
    element_forward_impl<A>(p.const_data_ptr<P>(), r.const_data_ptr<R>(), t.const_data_ptr<T>(), p.size(0) / 2,
                            p.size(1), prm, grad_coef, partials.mutable_data_ptr<double>(),
                            grad.defined() ? grad.mutable_data_ptr<A>() : nullptr);
  });
}

void sample_backward(const at::Tensor& p, const at::Tensor& r, const at::Tensor& t, const double* coef_t,
                     const double* coef_r, at::Tensor& grad) {
  dispatch3(p, r, t, [&](auto pv, auto rv, auto tv) {
    using P = decltype(pv);
    using R = decltype(rv);
    using T = decltype(tv);
    sample_backward_impl<acc_of<P>>(p.const_data_ptr<P>(), r.const_data_ptr<R>(), t.const_data_ptr<T>(),
                                    p.size(0), p.size(1), coef_t, coef_r, grad.mutable_data_ptr<P>());
  });
}

void scale_rows(const at::Tensor& saved, const double* scale, at::Tensor& out) {
  auto run = [&](auto sv, auto gv) {
    using A = decltype(sv);
    using G = decltype(gv);
    scale_rows_impl<A>(saved.const_data_ptr<A>(), saved.size(0), saved.size(1), scale, out.mutable_data_ptr<G>());
  };
  if (saved.scalar_type() == at::kDouble) {
    TORCH_CHECK(out.scalar_type() == at::kDouble, "pgdpo_cpu: a float64 saved gradient gives a float64 gradient");
    run(double{}, double{});
    return;
  }
  TORCH_CHECK(saved.scalar_type() == at::kFloat, "pgdpo_cpu: the saved gradient must be float32 or float64, got ",
              saved.scalar_type());
  dispatch_low(out.scalar_type(), "grad", [&](auto gv) { run(float{}, gv); });
}

}  // namespace pgdpo_cpu
