"""streamsvc benchmarks: ``python -m bench [parse]``. Each prints medians of repeats and
ratios against baselines measured in the same run; nothing here is asserted in tests."""
