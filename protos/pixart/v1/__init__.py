"""pixart.v1: generated from pixart.proto by `python -m protos.generate`; do not edit the *_pb2*.py files."""
