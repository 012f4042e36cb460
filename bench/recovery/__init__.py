"""Recovery under fire: SIGKILLs at 80% load. run.py measures, record.py writes the record."""
