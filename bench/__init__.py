"""omnidaemon's benchmark (issue 6): `bash bench/run.sh` or `python -m bench`.

Not a test: it measures omnidaemon's publish rates, drain rate, end-to-end latency, scaling
and memory against a plain redis-py loop on the same machine and server, and against
FastStream and Taskiq, then prints a table (and writes `bench/RESULTS.md` on a full run).
See `bench/__main__.py` for the options and `bench/report.py` for how each figure is measured.
"""
