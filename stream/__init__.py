"""Stream processing: the Quix Streams worker and the engine-agnostic evaluator it drives.

Import the worker from `tensorpulse.stream.worker` (it needs the `stream` extra).
"""
