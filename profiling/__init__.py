"""`ipop-trio profile` and profiling tools: py-spy / scalene runners, per-stage timings from the
node's stage timers, a self-contained HTML report, and micro benchmarks.

This package imports `ipop_trio`, never the reverse: the CLI finds the `profile` command
through the ``ipop_trio.commands`` entry point.
"""
