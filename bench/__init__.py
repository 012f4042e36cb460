"""The benchmarks: `make bench` (`python -m bench`) runs every section and rewrites
docs/PERFORMANCE.md and docs/img/. A section is a sub-package with a `run` module
(measures, writes its figures as JSON) and a `record` module (its part of the record,
from those figures; tested against saved figures in tests/). run_all.py runs the
sections, report.py assembles the record, common.py is what they share.
bench_gpu_1p5b.py and gpu_respawn.py are standalone scripts for a GPU machine.
"""
