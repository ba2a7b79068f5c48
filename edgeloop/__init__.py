"""edgeloop: edge-to-cloud active learning for object detection.

This top-level package is the part both the edge agent and the server import, so it stays
dependency-light: the wire contract (``edgeloop.v1``), the domain types (``edgeloop.domain``),
the protobuf <-> domain conversion (``edgeloop.convert``), the synthetic scene generator
(``edgeloop.synth``) and the ``edgeloop`` command line (``edgeloop.cli``).
"""

from edgeloop.offline import disable_library_telemetry

__version__ = "0.1.0"

# Before anything can import onnxruntime: its telemetry is only off if the variable is set first.
disable_library_telemetry()
