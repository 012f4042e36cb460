"""A peer, side by side: Ray Serve against the pool. run.py measures, record.py writes the record."""
