"""The model registry: versions with lineage, signed artifacts, channels, pins and rollbacks."""
