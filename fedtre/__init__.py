"""fedtre: a federated trusted research environment for mental-health data."""

__version__ = "0.1.0"
