"""The benchmarks: `make bench` (`python -m bench`) runs every section and rewrites
docs/PERFORMANCE.md and docs/img/. A section is a sub-package with a `run` module
(measures, writes its figures as JSON) and a `record` module (its part of the record,
from those figures; tested against saved figures in tests/). run_all.py runs the
sections, report.py assembles the record, common.py is what they share.
bench_gpu_1p5b.py, gpu_respawn.py, gpu_pool.py and gpu_all.py (which runs the other
three) are standalone scripts for a GPU machine (full_size.py: the 1.5B's and the Large's
architectures they build, `--model large`); gpu_record.py writes the record's GPU
section from the newest saved GPU run (docs/gpu/); cuda_image_size.py sizes the image;
step_dispatches.py counts the step engine's operators and host syncs per decode step on
CPU (the 1.5B depths at tiny widths), per phase; the shape section runs it beside the tiny
model's audio-s/s; kv_cache_cost.py times the LM's KV bookkeeping, dense against paged.
"""
