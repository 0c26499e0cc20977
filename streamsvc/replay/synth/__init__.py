"""Fixture synthesizers, one module per provider (the provider registry names each row's):
a call's frames in the provider's own wire format, built from audio and a plan of DTMF,
marks, drops and parameters. The plan, WAV reading and the expected outcome are shared
(:mod:`streamsvc.replay.synth.twilio`, the default provider's)."""

from __future__ import annotations

from streamsvc.replay.synth.twilio import (
    SessionPlan,
    expected_outcome,
    mulaw_encode,
    read_wav,
    sent_frames,
    synthesize,
)

__all__ = ["SessionPlan", "expected_outcome", "mulaw_encode", "read_wav", "sent_frames",
           "synthesize"]
