"""The HTTP/JSON transport: a thin layer beside gRPC and RunPod over the same `EmbedService`.

    app.py          HttpServer: aiohttp on the gRPC server's event loop; start, drain, stop
    connections.py  each connection: a cap per address, a time limit on request headers
    guards.py       middlewares: request ids, JSON errors, metrics; the API key and the shared call bounds
    routes.py       POST /v1/embed, POST /v1/embeddings, GET /v1/info, GET /health
    receive.py      request bodies read in a receive slot at a bounded pace, and parsed there
    json_body.py    JSON bodies decoded at a cost bounded before decoding
    bodies.py       /v1/embed's JSON job and multipart forms
    openai.py       the OpenAI embeddings request and response shape
    status.py       engine errors to HTTP statuses (one table) and the JSON error shape

No engine code: every route calls `EmbedService.embed`, as the gRPC servicer does.
"""
