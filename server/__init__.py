"""The edgeloop server: ingest (gRPC service and MQTT bridge) into a FiftyOne dataset, the model
registry that hands versions to the fleet, and device identity.

Installed with ``pip install edgeloop[server]``. FiftyOne is imported lazily (it takes seconds
and starts a database), so ``edgeloop server --help`` stays fast.
"""
