"""vibevoice-pool: serve VibeVoice on every GPU of a machine.

The parent side, in sub-packages named for the parts: pool/ (the facade,
dispatcher, policies, local slots and their supervision, monitor, devices),
api/ (HTTP), ui/ (the Gradio page), jobs/ (batch jobs), ray/ (the Ray
backend); CLI, config, server, audio, script and voices at the top. Imports here stay light, because a spawned worker
re-imports the parent's main module and must not pull in the front ends.
"""

__version__ = "0.1.0"
