"""Paired per-seed differences with a Student-t interval, for the report scripts (standard library only;
the C++ reports use include/moeforge/experiments/paired_stats.h)."""
import math
import statistics

# Two-sided 95% quantiles of Student's t, t_{0.975, df}, for df = 1..30 (standard tables); past 30 the
# normal 1.96 is within 2%.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def t975(df):
    return T975[df - 1] if df <= len(T975) else 1.96


def paired_interval(diffs):
    """Mean, sample sd and 95% t interval of per-seed differences (sd / lo / hi None under 2 values)."""
    n = len(diffs)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "lo": None, "hi": None}
    m = statistics.fmean(diffs)
    if n < 2:
        return {"n": 1, "mean": m, "sd": None, "lo": None, "hi": None}
    sd = statistics.stdev(diffs)
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": m, "sd": sd, "lo": m - half, "hi": m + half, "t_quantile": t975(n - 1)}
