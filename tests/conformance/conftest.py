"""The conformance run is a script, not a test module: the repository's pytest skips it.

``httpx_suite.py`` downloads httpx's sdist and runs httpx's tests in a
subprocess; the two plugins here are loaded by that subprocess only.
"""

collect_ignore = ["httpx_suite.py", "hostpool_swap.py", "conformance_outcomes.py"]
