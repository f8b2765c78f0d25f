"""Generated protobuf and gRPC stubs for the imago.v1 API (see protos/generate.py)."""
