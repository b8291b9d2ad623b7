"""gdn2 benchmarks: baselines, FLOP/byte model, runners and plots."""
