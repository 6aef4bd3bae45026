// Paired statistics (docs/comparison.md, "Paired statistics"): Student-t quantiles against the published
// table, a hand-computed interval, the verdict rules, Holm's levels, and on synthetic numbers the property
// the min-max rule lacks: a true gap is resolved more often as seeds are added, and a null gap about alpha
// of the time.
#include <cmath>
#include <random>

#include "moeforge/experiments/paired_stats.h"
#include "test_util.h"

namespace moeforge {
namespace {

TEST(PairedStats, StudentTQuantilesMatchTheTable) {
  // Two-sided 95% and other critical values as printed in t tables (e.g. NIST/SEMATECH e-Handbook of
  // Statistical Methods, table 1.4.2.2.7.2), to the 6 decimals printed: tolerance 1e-5.
  struct Row {
    double p;
    int df;
    double t;
  };
  for (const Row r : {Row{0.975, 1, 12.706205},
                      {0.975, 2, 4.302653},
                      {0.975, 4, 2.776445},
                      {0.975, 9, 2.262157},
                      {0.975, 29, 2.045230},
                      {0.95, 5, 2.015048},
                      {0.995, 10, 3.169273},
                      {0.9, 100, 1.290075}}) {
    EXPECT_NEAR(student_t_quantile(r.p, r.df), r.t, 1e-5) << "p " << r.p << ", df " << r.df;
    EXPECT_NEAR(student_t_quantile(1 - r.p, r.df), -r.t, 1e-5) << "p " << 1 - r.p << ", df " << r.df;
    EXPECT_NEAR(student_t_cdf(r.t, r.df), r.p, 1e-7);
  }
  EXPECT_THROW(student_t_quantile(0.0, 3), std::invalid_argument);
  EXPECT_THROW(student_t_quantile(0.5, 0), std::invalid_argument);
}

TEST(PairedStats, IntervalOfAHandComputedCase) {
  // Differences 0.5, 0.1, 0.6: mean 0.4, sd sqrt(0.14 / 2) = 0.264575; half-width t(0.975, 2) sd / sqrt(3).
  const auto d = paired_difference({1, 2, 3}, {1.5, 2.1, 3.6});
  EXPECT_EQ(d.n, 3);
  EXPECT_NEAR(d.mean, 0.4, 1e-12);
  EXPECT_NEAR(d.sd, std::sqrt(0.07), 1e-12);
  const double half = 4.302653 * std::sqrt(0.07) / std::sqrt(3.0);
  EXPECT_NEAR(d.lo, 0.4 - half, 1e-5);
  EXPECT_NEAR(d.hi, 0.4 + half, 1e-5);
  EXPECT_EQ(direction_verdict(d), PairedVerdict::kNotResolved);
  EXPECT_THROW(paired_difference({1, 2}, {1}), std::invalid_argument);
  const auto one = paired_difference({1}, {2});
  EXPECT_TRUE(std::isinf(one.lo) && std::isinf(one.hi));
}

TEST(PairedStats, VerdictsFollowTheInterval) {
  auto with = [](double lo, double hi) {
    PairedDifference d;
    d.n = 5;
    d.lo = lo;
    d.hi = hi;
    return d;
  };
  EXPECT_EQ(direction_verdict(with(-0.3, -0.1)), PairedVerdict::kLower);
  EXPECT_EQ(direction_verdict(with(0.1, 0.3)), PairedVerdict::kHigher);
  EXPECT_EQ(direction_verdict(with(-0.1, 0.3)), PairedVerdict::kNotResolved);
  // Bound 0.2: inside it both ways, below its upper end only, past it.
  EXPECT_EQ(equivalence_verdict(with(-0.1, 0.15), 0.2), PairedVerdict::kEquivalent);
  EXPECT_EQ(equivalence_verdict(with(-0.5, 0.15), 0.2), PairedVerdict::kNotWorse);
  EXPECT_EQ(equivalence_verdict(with(-0.1, 0.3), 0.2), PairedVerdict::kNotResolved);
  EXPECT_EQ(equivalence_verdict(with(0.05, 0.3), 0.2), PairedVerdict::kHigher);
  EXPECT_EQ(equivalence_verdict(with(-0.3, -0.05), 0.2), PairedVerdict::kLower);
  EXPECT_THROW(equivalence_verdict(with(0, 1), 0.0), std::invalid_argument);
}

TEST(PairedStats, HolmLevels) {
  // p sorted 0.01, 0.02, 0.04 with m = 3: levels 0.05/3, 0.05/2, 0.05/1; 0.01 passes, 0.02 passes (<=
  // 0.025), 0.04 passes (<= 0.05).
  auto l = holm_levels({0.04, 0.01, 0.02});
  EXPECT_NEAR(l[1], 0.05 / 3, 1e-15);
  EXPECT_NEAR(l[2], 0.05 / 2, 1e-15);
  EXPECT_NEAR(l[0], 0.05, 1e-15);
  // 0.03 fails at 0.025: it and every larger p get level 0 (not significant whatever it is).
  l = holm_levels({0.001, 0.03, 0.04});
  EXPECT_NEAR(l[0], 0.05 / 3, 1e-15);
  EXPECT_NEAR(l[1], 0.025, 1e-15);
  EXPECT_EQ(l[2], 0.0);
}

TEST(PairedStats, SeedsForAHalfWidth) {
  // The seed sd of a final validation loss, 0.018 nats, for an interval of +-0.01 nats.
  const double sd = 0.018, half = 0.01;
  const int n = seeds_for_half_width(sd, half);
  auto width = [&](int k) { return student_t_quantile(0.975, k - 1) * sd / std::sqrt(double(k)); };
  EXPECT_LE(width(n), half);
  EXPECT_GT(width(n - 1), half);
  EXPECT_EQ(seeds_for_half_width(0.0, half), 2);
}

// The share of `trials` synthetic comparisons with n seeds each in which `resolved(a, b)` says b is lower,
// when a_i ~ N(0, 1) and b_i ~ N(-gap, 1) independently (the seeds' effect shared by both is left out: it
// cancels in the paired difference and only widens the min-max ranges).
template <class Rule>
double resolved_share(int n, double gap, int trials, Rule resolved, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> z(0.0, 1.0);
  int hits = 0;
  for (int t = 0; t < trials; ++t) {
    std::vector<double> a(n), b(n);
    for (int i = 0; i < n; ++i) {
      a[size_t(i)] = z(rng);
      b[size_t(i)] = z(rng) - gap;
    }
    hits += resolved(a, b);
  }
  return double(hits) / trials;
}

bool paired_rule(const std::vector<double>& a, const std::vector<double>& b) {
  return direction_verdict(paired_difference(a, b)) == PairedVerdict::kLower;
}

bool min_max_rule(const std::vector<double>& a, const std::vector<double>& b) {
  return *std::max_element(b.begin(), b.end()) < *std::min_element(a.begin(), a.end());
}

TEST(PairedStats, ATrueGapIsResolvedMoreOftenAsSeedsAreAddedUnlikeTheMinMaxRule) {
  const int trials = 4000;
  // A true gap of 2 per-seed sd: the paired interval resolves it more often with every seed added...
  double last = 0;
  for (int n : {3, 5, 8}) {
    const double share = resolved_share(n, 2.0, trials, paired_rule, 11 + uint64_t(n));
    EXPECT_GT(share, last + 0.02) << n << " seeds";
    last = share;
  }
  EXPECT_GT(resolved_share(20, 2.0, trials, paired_rule, 31), 0.99);  // saturated
  // ...while the min-max rule resolves it less often (the 0.63 at 3 seeds, 0.37 at 5), toward 0.
  const double mm3 = resolved_share(3, 2.0, trials, min_max_rule, 21);
  const double mm5 = resolved_share(5, 2.0, trials, min_max_rule, 22);
  const double mm20 = resolved_share(20, 2.0, trials, min_max_rule, 23);
  // 4000 trials: the share's sd is at most 0.008; 0.04 is 5 of them.
  EXPECT_NEAR(mm3, 0.63, 0.04);
  EXPECT_NEAR(mm5, 0.37, 0.04);
  EXPECT_LT(mm20, mm5);
  // With no gap the paired rule says "lower" about alpha / 2 of the time (one side of a two-sided 95%
  // interval): 0.025, sd 0.0025 over 4000 trials; 0.01 is 4 of them.
  for (int n : {3, 10})
    EXPECT_NEAR(resolved_share(n, 0.0, trials, paired_rule, 31 + uint64_t(n)), 0.025, 0.01) << n;
}

}  // namespace
}  // namespace moeforge
