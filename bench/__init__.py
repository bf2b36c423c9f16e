"""Throughput benchmark of the embedding service against the model's own limit (issue 6).

`python -m bench --size small --dtype bfloat16` measures, in one run and on
the same generated JPEGs: the model alone (raw), the gRPC server in a
subprocess (service), the seed's one-image JSON handler (seed-style), idle
unary latency, the server's peak memory, and the machine's matmul ceiling.
See BENCHMARKS.md.
"""
