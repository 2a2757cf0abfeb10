"""Replay device bundles through the mobile runtimes' Python bindings: verify, measure, train, benchmark."""
import exporter  # noqa: F401  (quiets third-party import logs)
