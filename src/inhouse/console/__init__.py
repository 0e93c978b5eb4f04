"""The web console at ``/console``: a page and its assets shipped in the package, and the few
JSON endpoints it needs beside the server's public APIs (every one behind a declared Guard)."""
