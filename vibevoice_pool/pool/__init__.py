"""The pool: one dispatcher in front of many worker slots.

The facade (`facade.Pool`) that every front end asks; the dispatcher and its
scoring policies; the request handle; the local slot backend (supervisor,
worker processes, zygote, warm weights, request channel, voice sender); the
GPU monitor and the device plan. Nothing here imports a front end.
"""
