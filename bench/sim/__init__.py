"""Simulator benchmarks (the simulator itself is pdserve.sim): `python -m bench.sim.run` replays the Mooncake
trace through every routing policy; `python -m bench.sim.autoscale` runs pdserve's autoscaling policy against
static and per-pool autoscalers; calibrate.py and gpu_model.py write the latency calibrations.
"""
