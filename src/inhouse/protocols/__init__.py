"""Protocol adapters: wire formats in, ``DataPlane`` calls, wire formats out."""
