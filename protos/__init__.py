"""Generated gRPC and protobuf code for the custos.v1 wire contract (see custos.proto)."""
