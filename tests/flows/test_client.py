"""flows.client refuses, with the fix, when no Prefect server is configured, instead of letting
Prefect start a temporary server of its own that holds none of our deployments (the run would
never be picked up, and the curator's button would say "started")."""

from __future__ import annotations

import socket

import pytest


def test_without_a_configured_server_starting_a_run_fails_with_the_fix(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.client import FlowStartError, start_retrain, wait_for_run
    from server.curation.hooks import RetrainingUnavailable, start_retraining

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(FlowStartError, match="PREFECT_API_URL is not set"):
            start_retrain("ds-0002")
        with pytest.raises(FlowStartError, match="no Prefect server is configured"):
            wait_for_run("00000000-0000-0000-0000-000000000000", 1.0)
        with pytest.raises(RetrainingUnavailable, match="cannot start: no Prefect server is configured"):
            start_retraining("ds-0002")


def test_a_configured_server_that_does_not_answer_is_reported():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.client import FlowStartError, start_retrain

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with (
        temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}),
        pytest.raises(FlowStartError, match="cannot start retrain/retrain"),
    ):
        start_retrain("ds-0002")
