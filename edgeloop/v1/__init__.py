"""Generated protobuf and gRPC code for the edgeloop.v1 wire contract (see proto/).

Do not edit the *_pb2* modules by hand: run ``python scripts/gen_proto.py``.
"""
