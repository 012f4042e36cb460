"""vibevoice-pool: serve VibeVoice on every GPU of a machine.

The parent side: CLI, config, dispatcher, policies, supervisor, monitor,
HTTP API and Gradio page. Imports here stay light, because a spawned worker
re-imports the parent's main module and must not pull in the front ends.
"""

__version__ = "0.1.0"
