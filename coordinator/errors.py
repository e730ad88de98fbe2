"""Coordinator-side exceptions. Researcher-facing refusals are ``fedtre.errors.QueryRefused``."""

from __future__ import annotations

from fedtre.errors import ConfigError


class CoordinatorConfigError(ConfigError):
    """The coordinator's config file is invalid; raised at start-up."""
