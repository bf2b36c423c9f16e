"""Embed a dataset on a Ray cluster with the service's own engine: `python -m offline embed SOURCE... -o OUT_DIR`.

Stages, each a Ray Data operator (offline/job.py builds them):
read (Ray's `read_binary_files`) -> decode (CPU tasks, offline/stages.py: the
service's exact `server.preprocess.decode`, tar members expanded; a bad image
becomes a row with an error) -> embed (an actor pool, offline/embed.py: one
`ModelRunner` per actor) -> write (CPU tasks; Parquet parts renamed into
place, offline/store.py).

Ray is an optional extra (`pip install -e '.[ray]'`); nothing else in the
project imports this package, and it imports nothing of `client/` (whose
package pulls in grpc and the RunPod client).
"""
