"""VibeVoice through transformers: engine.py (VibeVoiceEngine: load, check, cap), step.py
(the step engine: continuous batching), audio.py (diffusion and the streaming decode),
caches.py (per-row KV and conv caches), prompt.py (microsoft's prompt format), noise.py
(per-row generators). torch is imported only when an engine loads."""
