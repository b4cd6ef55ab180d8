"""The ``routing_policy`` setting: two values, a one-line error for anything else."""

from __future__ import annotations

import pytest

from router_service.settings import RouterSettings, SettingsError


def test_default_is_sticky_and_least_loaded_is_accepted() -> None:
    assert RouterSettings.load().routing_policy == "sticky"
    assert RouterSettings.load(routing_policy="least_loaded").routing_policy == "least_loaded"


def test_an_unknown_policy_names_the_setting() -> None:
    with pytest.raises(SettingsError, match="routing_policy"):
        RouterSettings.load(routing_policy="random")
