"""
The built-in sandbox vendor: a loopback sticky-session gateway for the demo,
the tests and the benchmarks.
"""
