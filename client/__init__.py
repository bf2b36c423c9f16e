"""Client library for the DINOv2 embedding service: images in, numpy embeddings out.

    from client import EmbedClient
    with EmbedClient("localhost:50051") as client:
        vectors = client.embed(["cat.jpg", "dog.png"])  # float32 [2, D]

See client/README.md for streaming, asyncio, errors, TLS and the command line.
"""

from client.async_client import POOLINGS, AsyncEmbedClient
from client.connection import RetryPolicy
from client.errors import EmbedClientError, EmbedItemsError, EmbedRequestError, ItemError, ItemResult
from client.runpod_client import RunPodClient, RunPodError
from client.sync_client import EmbedClient

__all__ = [
    "POOLINGS",
    "AsyncEmbedClient",
    "EmbedClient",
    "EmbedClientError",
    "EmbedItemsError",
    "EmbedRequestError",
    "ItemError",
    "ItemResult",
    "RetryPolicy",
    "RunPodClient",
    "RunPodError",
]
