"""The child side of vibevoice-pool: what runs in a worker process or a Ray replica.

    wire/         the contract the parent reads: messages, the status board, the estimate
    host/         the worker process loop, the step host, the sink, the voice cache, the replica
    zygote/       what the zygote preloads, and the probe that checks a forked child
    engines/      the engine contract and Row, the factory, the simulator, vibevoice/
    checkpoints/  command-line tools: original-layout conversion, the tiny model

Nothing here imports the parent package (vibevoice_pool), so a worker never
loads Gradio or FastAPI."""
