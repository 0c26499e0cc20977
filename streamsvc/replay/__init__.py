"""The stream simulator: fixture sessions (:mod:`streamsvc.replay.fixture`) played at a
running server like the provider would (:mod:`streamsvc.replay.client`), whole calls through
the voice webhook (:mod:`streamsvc.replay.call`), the outcome checked against the fixture's
``expect`` (:mod:`streamsvc.replay.check`), and fixtures synthesized per provider
(:mod:`streamsvc.replay.synth`)."""

from __future__ import annotations

from streamsvc.replay.client import (
    ReplayReport,
    SessionResult,
    replay,
    replay_session,
    signature_headers,
)
from streamsvc.replay.signing import Signing, acs_token, upgrade_headers, write_acs_keys

__all__ = ["ReplayReport", "SessionResult", "Signing", "acs_token", "replay",
           "replay_session", "signature_headers", "upgrade_headers", "write_acs_keys"]
