"""Engine hosts: what runs an engine inside a worker process or a Ray replica.

worker.py (the worker process: its entry, the loop, heartbeats, the death pipe),
step_host.py (StepHost: the scheduler, schedule / execute / update; every row queue,
cancels, out-of-memory, preemption, the speed estimate),
sink.py (HostSink: rows' audio and outcomes -> messages), voice_cache.py (kept voice
samples), ray_replica.py (the same host in a Ray Serve replica). Uses wire/ and engines/."""
