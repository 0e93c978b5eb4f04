"""The HTTP front end: the ASGI app, its middleware, the v2 infer entry and the fast path."""
