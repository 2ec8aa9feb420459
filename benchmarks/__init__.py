"""Benchmarks for hostpool: isolation, throughput, many hosts, scheduler, footprint.

Run everything with ``python -m benchmarks`` (see ``python -m benchmarks --help``).
Every client under test runs in this process, interleaved with its peers; the
upstream server runs in a separate process (:mod:`benchmarks.upstream`) and
only ever listens on loopback addresses.

These are benchmarks, not tests: nothing here asserts on timings. CI runs
``python -m benchmarks --quick`` only to keep the code from rotting.
"""
