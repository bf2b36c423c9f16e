"""DINOv2 image-embedding engine and gRPC server.

Layers, top to bottom: grpc_service (transport) -> service (validate, decode,
submit) -> batcher (queue, batches, futures) -> model (tensors in, embeddings out).
"""
