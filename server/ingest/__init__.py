"""Ingest: one validation and storage path (``core``) behind two transports (``grpc_service``,
``mqtt_bridge``)."""
