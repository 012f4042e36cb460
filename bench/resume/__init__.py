"""Long rows that survive: SIGKILL at 80% of a row, resumed against replayed. run.py measures, record.py writes the record."""
