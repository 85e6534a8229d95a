"""The serving benchmark's arithmetic: the confidence interval of a median, the rounds' order (no vLLM)."""

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from serve_bench import median_ci95, rotated  # noqa: E402


def test_order_statistics_by_size():
    assert median_ci95([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # 2 * 2^-5 > 5 %: no interval exists
    assert median_ci95([6.0, 1.0, 5.0, 2.0, 4.0, 3.0]) == (1.0, 6.0)  # n = 6: min and max (96.9 %)
    assert median_ci95([float(v) for v in range(9, 0, -1)]) == (2.0, 8.0)  # n = 9: 2nd and 8th
    assert median_ci95([float(v) for v in range(1, 31)]) == (10.0, 21.0)  # n = 30: 10th and 21st


def test_covers_the_true_median_at_least_95_percent_of_the_time():
    rng = random.Random(0)
    for n in (6, 9, 15, 30):
        trials, covered = 2000, 0
        for _ in range(trials):
            ci = median_ci95([rng.expovariate(1.0) for _ in range(n)])  # skewed: true median ln 2
            covered += ci[0] <= 0.6931471805599453 <= ci[1]
        assert covered / trials >= 0.94, (n, covered / trials)


def test_rounds_rotate_the_workload_order_and_allow_base_alone():
    assert rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert rotated(["a", "b", "c"], 4) == ["b", "c", "a"]
    assert rotated([], 3) == []  # only base asked for: no other workload to pair with it
