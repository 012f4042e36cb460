"""The Ray slot backend: the cluster and its replicas, the per-slot streams,
and the supervisor-shaped adapter the pool drives. Imports Ray only here."""
