"""A whole cluster on one machine, for trying cluster mode and for the cluster benchmark and tests:
redis-server and SeaweedFS as child processes (`services`), upload_server nodes and a round-robin
proxy in front of them (`proxy`), started and stopped together (`cluster.LocalCluster`).

    python -m benchmarks.localcluster        # from the repository root; see `__main__`

A development harness, not part of the installed package.
"""

from .cluster import BUCKET, PREFIX, LocalCluster

__all__ = ["BUCKET", "PREFIX", "LocalCluster"]
