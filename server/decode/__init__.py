"""Decoding: encoded images to resized grayscale pixels, in parallel, fair between callers.

    pool.py     the pool: callers take turns in lanes, chunks handed back to the event loop
    decoder.py  what a pool thread decodes through, and decoding on the thread itself
    worker.py   the parent's handle on a decode worker process (restarts, timeouts, backoff)
    child.py    the worker process itself (Pillow and numpy only; dies with the server)
    wire.py     the binary frames between the two (never pickle)
    setup.py    what a worker process starts with: settings and an environment without secrets
    budget.py   the bound on full-size pixels decoded at once over every worker

Nothing here imports PyTorch or gRPC, so a worker process starts light.
"""
