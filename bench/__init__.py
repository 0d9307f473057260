"""Measurement tools: benchmarks, the load test, the fault harness and the fuzzer (`python -m bench --help`).

They drive the product from outside, as an operator would, and are not part of it:
this folder is not in the wheel nor in the images.
"""
