"""Checkpoint tools, run from the command line rather than by a worker: convert.py
(the original microsoft/VibeVoice layout -> the HF layout) and tiny.py (the tiny
random-weight VibeVoice that tests and the demo run)."""
