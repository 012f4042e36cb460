"""Respawn: a killed tiny-model worker serving again. run.py measures, record.py writes the record."""
