"""tensorpulse: a real-time debugger for ML training, streamed over Kafka."""

__version__ = "0.1.0"
