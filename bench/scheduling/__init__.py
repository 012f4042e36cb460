"""Scheduling quality: the policies against a central-queue bound. run.py measures, record.py writes the record."""
