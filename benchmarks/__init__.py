"""ewc_fast benchmarks (not tests): timings are ratios against baselines measured in the same run."""
