"""Coordinator-side exceptions. Researcher-facing refusals are ``fedtre.errors.QueryRefused``."""

from __future__ import annotations

from fedtre.errors import ConfigError, InternalError


class CoordinatorConfigError(ConfigError):
    """The coordinator's config file is invalid; raised at start-up."""


class NodeAnswerError(InternalError):
    """A trust's answer does not fit the query or the contract: that trust is marked failed."""
