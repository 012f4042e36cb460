"""The real model, tiny, on CPU: continuous batching against static batches. run.py measures, record.py writes the record."""
