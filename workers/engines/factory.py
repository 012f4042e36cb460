"""The engines by name: `build_engine(spec)` constructs the one a spec names.

The one place that knows every engine. workers/engines/contract.py holds the contract
(EngineSpec, Engine, StepOutput) the engines implement; this module sits above
both, so no engine imports its own factory. To add an engine, write a class
that keeps the contract and add a branch here (and its name to the config's
choices).
"""

from __future__ import annotations

from workers.engines.contract import Engine, EngineSpec


def build_engine(spec: EngineSpec) -> Engine:
    """Construct (not load) the engine a spec names. Imports lazily, so a sim
    worker never imports torch."""
    if spec.engine == "sim":
        from workers.engines.sim import SimEngine

        return SimEngine(spec)
    if spec.engine == "vibevoice":
        from workers.engines.vibevoice.engine import VibeVoiceEngine

        return VibeVoiceEngine(spec)
    raise ValueError(f"unknown engine {spec.engine!r}: choose sim or vibevoice")
