"""The HTTP front end: the FastAPI app and its routers.

The native and OpenAI speech routes, voices, jobs and live-scaling routes,
metrics, API keys, the error shape, and the connection and browser guards.
"""
