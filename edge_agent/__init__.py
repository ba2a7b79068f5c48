"""The edgeloop edge agent: detect, score uncertainty, keep frames durably, upload them.

Installed on devices with ``pip install edgeloop[edge]``; it must never import torch, FiftyOne
or Prefect at module level (the ultralytics detector backend imports them lazily, on demand).
"""
