"""The engines: contract.py (Engine, EngineSpec, StepSink: what a host calls), row.py
(Row: one request's engine-neutral bookkeeping), factory.py (build_engine: the one place
that knows every engine), sim.py (SimEngine) and vibevoice/ (the real model). An engine
knows nothing of processes; it imports wire/ and never host/."""
