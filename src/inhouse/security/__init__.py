"""Security and privacy, transport-free: API keys, access decisions, rate limits, IP rules,
the audit log, PII redaction, content policies and model encryption. The HTTP middleware
(``transports/http/security.py``) and the gRPC interceptor (``transports/grpc/security.py``)
call into :class:`inhouse.security.gate.SecurityGate`; nothing here knows about either."""
