"""The child side of vibevoice-pool: the worker process, its messages and its
engines. Nothing here imports the parent package (vibevoice_pool), so a worker
never loads Gradio or FastAPI."""
