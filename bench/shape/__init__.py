"""The step engine's shape on CPU (issue 22): dispatches and host syncs per step, audio-s/s of continuous batching against transformers' generate. run.py measures, record.py writes the record."""
