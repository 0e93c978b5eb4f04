"""Security and privacy, transport-free: API keys, access decisions, rate limits, IP rules,
the audit log, PII redaction, content policies and model encryption. The HTTP middleware
(``protocols/security_http.py``) and the gRPC interceptor (``protocols/security_grpc.py``)
call into :class:`inhouse.security.gate.SecurityGate`; nothing here knows about either."""
