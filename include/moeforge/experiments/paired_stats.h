// Paired statistics for comparing two variants trained on the same seeds (docs/comparison.md, "Paired
// statistics"): a seed fixes the data order and the initialisation of every variant, so the per-seed
// difference removes the seed's own effect, and its mean gets a Student-t confidence interval. Verdicts are
// read from the interval: a direction is resolved when the interval excludes 0 on that side; "equal or
// better" is judged against an equivalence bound fixed before the run (non-inferiority). Unlike the
// min-max rule (ranges apart), a true gap is resolved more often, not less, as seeds are added (tested on
// synthetic numbers in tests/test_paired_stats.cpp).
#pragma once

#include <string>
#include <vector>

namespace moeforge {

// The inverse of Student's t distribution function with `df` degrees of freedom: t such that P(T <= t) = p,
// for 0 < p < 1, df >= 1 (bisection on the distribution function, itself from the regularised incomplete
// beta function; |error| < 1e-10).
double student_t_quantile(double p, int df);
// P(T <= t) for Student's t with `df` degrees of freedom.
double student_t_cdf(double t, int df);

// The mean per-seed difference b - a over n paired seeds, its sample standard deviation, and the two-sided
// (1 - alpha) t interval [lo, hi]. n < 2: no interval (lo = -inf, hi = +inf).
struct PairedDifference {
  int n = 0;
  double mean = 0, sd = 0, lo = 0, hi = 0, alpha = 0.05;
};
// Throws std::invalid_argument when a and b differ in length (the seeds must pair).
PairedDifference paired_difference(const std::vector<double>& a, const std::vector<double>& b,
                                   double alpha = 0.05);

enum class PairedVerdict {
  kLower,        // b - a < 0 resolved (the interval lies below 0)
  kHigher,       // b - a > 0 resolved
  kEquivalent,   // the interval lies inside (-bound, +bound)
  kNotWorse,     // the interval's upper end is below +bound (non-inferiority, lower is better)
  kNotResolved,  // none of the above
};
std::string to_string(PairedVerdict v);

// The verdict on "b lower than a" (lower is better, e.g. a loss): kLower when resolved, kHigher when the
// opposite is resolved, else kNotResolved.
PairedVerdict direction_verdict(const PairedDifference& d);
// The verdict on "b no worse than a" within `bound` (> 0, in the measure's units, fixed before the run):
// kLower when b is resolved better, kEquivalent when the whole interval is within +-bound, kNotWorse when
// its upper end is below +bound, kHigher when it is resolved worse, else kNotResolved.
PairedVerdict equivalence_verdict(const PairedDifference& d, double bound);

// Holm's step-down adjustment for m comparisons at family-wise level `alpha`: the level each comparison is
// tested at, given the p-values, in their order (the k-th smallest p is tested at alpha / (m - k + 1), and
// once one fails every larger p fails: its level is then 0).
std::vector<double> holm_levels(const std::vector<double>& p_values, double alpha = 0.05);
// The two-sided p-value of the paired t test of mean difference 0 (1 when n < 2 or sd = 0 with mean 0).
double paired_p_value(const PairedDifference& d);

// The seeds a paired comparison needs so that its (1 - alpha) interval's half-width is at most
// `half_width`, when the per-seed differences have standard deviation `sd` (t quantiles, so it is exact
// for the half-width's expected size, not a power calculation); at least 2.
int seeds_for_half_width(double sd, double half_width, double alpha = 0.05, int max_seeds = 1000);

}  // namespace moeforge
