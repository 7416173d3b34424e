"""Trace-driven simulator of a pdserve cluster: simulated workers in virtual time, driven by the real Router.

`python -m bench.sim.run` replays the Mooncake trace through every routing policy (run.py); `python -m
bench.sim.autoscale` runs pdserve's autoscaling policy against static and per-pool autoscalers (autoscale.py).
"""
