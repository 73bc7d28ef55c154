"""Where results go: Prometheus metrics and the alerts topic."""
