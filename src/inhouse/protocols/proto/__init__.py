"""KServe v2 gRPC: the .proto and the stubs generated from it by scripts/gen_proto.sh."""
