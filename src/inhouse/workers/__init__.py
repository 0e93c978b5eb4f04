"""Worker processes: ``workers: N`` runs N copies of the server on the same ports
(``SO_REUSEPORT``) under one supervisor, which keeps their models, metrics and lifecycle as one."""
