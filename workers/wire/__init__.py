"""The wire contract: what both sides of the process boundary read.

messages.py (every message that crosses the pipes), board.py (the shared-memory
status table, one writer per column) and estimate.py (script -> audio seconds,
which the parent and the simulator must agree on). Imports nothing else of workers/."""
