// Paired statistics (docs/comparison.md, "Paired statistics"). See the header for the legend.
#include "moeforge/experiments/paired_stats.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>

namespace moeforge {

namespace {

// The continued fraction of the regularised incomplete beta function I_x(a, b), by the modified Lentz
// method (converges fast for x < (a + 1) / (a + b + 2)).
double beta_continued_fraction(double a, double b, double x) {
  constexpr double kTiny = 1e-300, kEps = 1e-15;
  double c = 1.0, d = 1.0 - (a + b) * x / (a + 1.0);
  if (std::fabs(d) < kTiny) d = kTiny;
  d = 1.0 / d;
  double h = d;
  for (int m = 1; m <= 500; ++m) {
    const double m2 = 2.0 * m;
    double num = m * (b - m) * x / ((a + m2 - 1.0) * (a + m2));  // even step
    d = 1.0 + num * d;
    c = 1.0 + num / c;
    d = 1.0 / (std::fabs(d) < kTiny ? kTiny : d);
    c = std::fabs(c) < kTiny ? kTiny : c;
    h *= d * c;
    num = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0));  // odd step
    d = 1.0 + num * d;
    c = 1.0 + num / c;
    d = 1.0 / (std::fabs(d) < kTiny ? kTiny : d);
    c = std::fabs(c) < kTiny ? kTiny : c;
    const double delta = d * c;
    h *= delta;
    if (std::fabs(delta - 1.0) < kEps) break;
  }
  return h;
}

// I_x(a, b).
double incomplete_beta(double a, double b, double x) {
  if (x <= 0) return 0;
  if (x >= 1) return 1;
  const double front =
      std::exp(std::lgamma(a + b) - std::lgamma(a) - std::lgamma(b) + a * std::log(x) + b * std::log1p(-x));
  if (x < (a + 1.0) / (a + b + 2.0)) return front * beta_continued_fraction(a, b, x) / a;
  return 1.0 - front * beta_continued_fraction(b, a, 1.0 - x) / b;
}

}  // namespace

double student_t_cdf(double t, int df) {
  if (df < 1) throw std::invalid_argument("student_t_cdf: df must be >= 1");
  if (std::isinf(t)) return t > 0 ? 1.0 : 0.0;
  const double v = double(df);
  const double tail = 0.5 * incomplete_beta(0.5 * v, 0.5, v / (v + t * t));  // P(T > |t|)
  return t >= 0 ? 1.0 - tail : tail;
}

double student_t_quantile(double p, int df) {
  if (!(p > 0 && p < 1)) throw std::invalid_argument("student_t_quantile: p must be in (0, 1)");
  if (df < 1) throw std::invalid_argument("student_t_quantile: df must be >= 1");
  if (p == 0.5) return 0;
  // Bracket, then bisect: the distribution function is monotone, and 200 halvings of [-1e7, 1e7] are
  // below 1e-10.
  double lo = -1.0, hi = 1.0;
  while (student_t_cdf(lo, df) > p && lo > -1e7) lo *= 2;
  while (student_t_cdf(hi, df) < p && hi < 1e7) hi *= 2;
  for (int i = 0; i < 200 && hi - lo > 1e-12; ++i) {
    const double mid = 0.5 * (lo + hi);
    (student_t_cdf(mid, df) < p ? lo : hi) = mid;
  }
  return 0.5 * (lo + hi);
}

PairedDifference paired_difference(const std::vector<double>& a, const std::vector<double>& b, double alpha) {
  if (a.size() != b.size())
    throw std::invalid_argument("paired_difference: " + std::to_string(a.size()) + " and " +
                                std::to_string(b.size()) + " values do not pair by seed");
  if (!(alpha > 0 && alpha < 1)) throw std::invalid_argument("paired_difference: alpha must be in (0, 1)");
  PairedDifference d;
  d.n = int(a.size());
  d.alpha = alpha;
  if (d.n == 0) {
    d.lo = -std::numeric_limits<double>::infinity();
    d.hi = std::numeric_limits<double>::infinity();
    return d;
  }
  std::vector<double> diff(a.size());
  for (size_t i = 0; i < a.size(); ++i) diff[i] = b[i] - a[i];
  d.mean = std::accumulate(diff.begin(), diff.end(), 0.0) / double(d.n);
  if (d.n < 2) {
    d.lo = -std::numeric_limits<double>::infinity();
    d.hi = std::numeric_limits<double>::infinity();
    return d;
  }
  double ss = 0;
  for (double x : diff) ss += (x - d.mean) * (x - d.mean);
  d.sd = std::sqrt(ss / double(d.n - 1));
  const double half = student_t_quantile(1.0 - alpha / 2.0, d.n - 1) * d.sd / std::sqrt(double(d.n));
  d.lo = d.mean - half;
  d.hi = d.mean + half;
  return d;
}

std::string to_string(PairedVerdict v) {
  switch (v) {
    case PairedVerdict::kLower:
      return "lower (resolved)";
    case PairedVerdict::kHigher:
      return "higher (resolved)";
    case PairedVerdict::kEquivalent:
      return "equivalent within the bound";
    case PairedVerdict::kNotWorse:
      return "not worse than the bound";
    case PairedVerdict::kNotResolved:
      return "not resolved";
  }
  return "not resolved";
}

PairedVerdict direction_verdict(const PairedDifference& d) {
  if (d.hi < 0) return PairedVerdict::kLower;
  if (d.lo > 0) return PairedVerdict::kHigher;
  return PairedVerdict::kNotResolved;
}

PairedVerdict equivalence_verdict(const PairedDifference& d, double bound) {
  if (!(bound > 0)) throw std::invalid_argument("equivalence_verdict: the bound must be > 0");
  if (d.hi < 0) return PairedVerdict::kLower;
  if (d.lo > 0) return PairedVerdict::kHigher;
  if (d.lo > -bound && d.hi < bound) return PairedVerdict::kEquivalent;
  if (d.hi < bound) return PairedVerdict::kNotWorse;
  return PairedVerdict::kNotResolved;
}

std::vector<double> holm_levels(const std::vector<double>& p, double alpha) {
  const size_t m = p.size();
  std::vector<size_t> order(m);
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t i, size_t j) { return p[i] < p[j]; });
  std::vector<double> level(m, 0.0);
  for (size_t k = 0; k < m; ++k) {
    const double lk = alpha / double(m - k);
    level[order[k]] = lk;
    if (p[order[k]] > lk) break;  // this one fails, and so do all larger p (their level stays 0)
  }
  return level;
}

double paired_p_value(const PairedDifference& d) {
  if (d.n < 2) return 1.0;
  if (d.sd == 0) return d.mean == 0 ? 1.0 : 0.0;
  const double t = d.mean / (d.sd / std::sqrt(double(d.n)));
  return 2.0 * (1.0 - student_t_cdf(std::fabs(t), d.n - 1));
}

int seeds_for_half_width(double sd, double half_width, double alpha, int max_seeds) {
  if (!(sd >= 0) || !(half_width > 0))
    throw std::invalid_argument("seeds_for_half_width: sd >= 0, half_width > 0");
  for (int n = 2; n <= max_seeds; ++n)
    if (student_t_quantile(1.0 - alpha / 2.0, n - 1) * sd / std::sqrt(double(n)) <= half_width) return n;
  return max_seeds;
}

}  // namespace moeforge
