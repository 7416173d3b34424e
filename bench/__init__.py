"""pdserve's benchmarks: each prints a table and writes bench/results/NAME.json. Run one as `python -m bench.NAME`
or `python bench/NAME.py`; they drive HTTP load through `pdserve.load` and deployments through `pdserve.live`."""
