"""Trace-driven simulator of a pdserve cluster: simulated workers in virtual time, driven by the real Router and
the real autoscaling policy; `pdserve plan` runs it over layouts, `bench/sim` runs it as benchmarks."""
