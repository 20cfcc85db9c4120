"""pytest-benchmark suites of mulclip-fast (run ``pytest benchmarks --benchmark-only``)."""
