"""VibeVoice through transformers: engine.py (VibeVoiceEngine: load, check, cap), step.py
(the step engine: continuous batching), audio.py (diffusion and the streaming decode),
paged_kv.py (the LM's paged KV cache), caches.py (the streaming conv caches), prompt.py
(microsoft's prompt format), noise.py (per-row generators). torch is imported only when an engine loads."""
