"""One sentinel value for every secret a tensorpulse client can be given, for the tests that grep
logs and shown configurations for it (tests/unit/test_redact.py, tests/integration/test_secrets.py)."""

from __future__ import annotations

SENTINEL = "s3ntinel-c0ffee"

#: Every librdkafka property that holds a secret, as an operator sets it through the environment.
SECRET_ENV = {
    "TENSORPULSE_KAFKA_SASL_PASSWORD": SENTINEL,
    "TENSORPULSE_KAFKA_SASL_OAUTHBEARER_CONFIG": f"principal=tp scope=all token={SENTINEL}",
    "TENSORPULSE_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": SENTINEL,
    "TENSORPULSE_KAFKA_SSL_KEY_PASSWORD": SENTINEL,
    "TENSORPULSE_KAFKA_SSL_KEYSTORE_PASSWORD": SENTINEL,
    "TENSORPULSE_KAFKA_SSL_KEY_PEM": f"-----BEGIN PRIVATE KEY-----{SENTINEL}",
}
