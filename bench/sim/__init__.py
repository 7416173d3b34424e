"""Trace-driven simulator of a pdserve cluster: simulated workers in virtual time, driven by the real Router.

`python -m bench.sim.run` replays the Mooncake trace through every routing policy; see run.py.
"""
