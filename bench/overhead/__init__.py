"""Dispatch overhead: zero-work latency, decisions/s, HTTP against a bare handler. run.py measures, record.py writes the record."""
