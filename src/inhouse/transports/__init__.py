"""Front ends: how requests arrive (HTTP, gRPC) and the cross-cutting steps around every route."""
