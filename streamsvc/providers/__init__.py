"""The providers: one Sans-I/O codec each (:class:`~streamsvc.wire.Codec`), turning a
provider's frames into the service's common events and its outbound commands (audio, mark,
clear) into the provider's frames; and one row each in :data:`REGISTRY`, the only place the
rest of the service learns what differs between providers.

A route names its provider (``provider = "twilio"`` by default, ``"acs"``, ``"telnyx"``,
``"signalwire"``, ``"exotel"``, ``"plivo"``, ``"vonage"``, ``"genesys"``, ``"asterisk"``,
``"jambonz"`` or ``"auto"``). A row says how to
build a stream's codec from its upgrade, which settings hold the provider's stream
credential and how an upgrade is checked against it, whether an upgrade claims to be the
provider's (on an ``auto`` route), whether the call's context travels on the wire, the form
its voice webhook answers in, how a replay peer answers marks, and where its fixture
synthesizer lives. Adding a provider is its module(s), one row here and a fixture
(``docs/architecture.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from streamsvc.providers import credentials as checks
from streamsvc.providers.acs import AcsCodec
from streamsvc.providers.asterisk import AsteriskCodec
from streamsvc.providers.auto import AutoCodec
from streamsvc.providers.exotel import ExotelCodec
from streamsvc.providers.genesys import ORGANIZATION_HEADER, GenesysCodec
from streamsvc.providers.genesys_auth import API_KEY_HEADER
from streamsvc.providers.jambonz import SUBPROTOCOL as JAMBONZ_SUBPROTOCOL
from streamsvc.providers.jambonz import JambonzCodec
from streamsvc.providers.plivo import NONCE_HEADER, SIGNATURE_V3_HEADER, PlivoCodec
from streamsvc.providers.signalwire import SignalWireCodec
from streamsvc.providers.telnyx import TelnyxCodec
from streamsvc.providers.twilio import TWILIO, TwilioCodec
from streamsvc.providers.vonage import VonageCodec
from streamsvc.wire import Codec, Upgrade

__all__ = [
    "AUTO",
    "PROVIDERS",
    "REGISTRY",
    "TWILIO",
    "Codec",
    "CodecOptions",
    "Provider",
    "TwilioCodec",
    "codec_for",
    "provider",
]


@dataclass(frozen=True, slots=True)
class CodecOptions:
    """What a route and the settings tell a codec besides the upgrade."""

    unmixed: bool = False  # ACS: each participant its own track
    l16_little_endian: bool = False  # SignalWire: L16 arrives little-endian
    # Genesys: the channels to ask for, "both" (stereo) or "external" (the customer's).
    channels: str = "both"
    # jambonz: the verb sets bidirectionalAudio.streaming (audio back as binary frames).
    streaming: bool = False


Check = Callable[[Upgrade, checks.Credentials], str | None]


@dataclass(frozen=True, slots=True)
class Provider:
    """One provider's row in the registry (see the module docstring)."""

    name: str
    codec: Callable[[Upgrade, CodecOptions], Codec]
    # The settings that hold its stream credential (any set: upgrades are checked), and
    # where an operator sets it, for messages ("set TWILIO_AUTH_TOKEN").
    settings: tuple[str, ...]
    credential_env: str
    # The check, and what it looks at (``server.listening``'s ``auth``).
    check: Check | None
    credential: str | None
    # On an auto route: whether the upgrade carries this provider's kind of credential.
    claims: Callable[[Upgrade], bool]
    # The call's context comes on the stream (custom parameters); False: from the store.
    context_on_wire: bool
    # The form of its voice webhook's answer, or None: it has none (ACS answers through
    # /acs/events; auto cannot know whose to answer).
    webhook: str | None
    # How a replay peer answers marks: "mark" (Twilio's camelCase mark echo),
    # "mark:<key>" (the snake_case one, the stream's id under <key>), "checkpoint" (Plivo's
    # playedStream), "notify" (Vonage's websocket:notify, and it confirms a clear),
    # "genesys" (Genesys's session protocol: it waits for opened, answers pause, resume and
    # disconnect, and playback_completed once the audio sent has played), "asterisk"
    # (MEDIA_MARK_PROCESSED, FLUSH_MEDIA, HANGUP), "jambonz" (playDone, killAudio,
    # disconnect), or "none" (ACS has no marks).
    peer: str
    # The module of its fixture synthesizer.
    synth: str | None
    # The WebSocket subprotocol the handshake answers with, from those the client offered
    # (jambonz's audio.jambonz.org; Asterisk's, whatever its connection offers), or None.
    subprotocol: Callable[[Sequence[str]], str | None] = lambda offered: None

    def configured(self, source: object) -> bool:
        """Whether its stream credential is set in ``source`` (the settings, or the
        :class:`~streamsvc.providers.credentials.Credentials` built from them)."""
        return any(getattr(source, key, None) for key in self.settings)


def _authorization_scheme(upgrade: Upgrade) -> str:
    return (upgrade.get(checks.AUTHORIZATION) or "").partition(" ")[0].lower()


def _acs_claims(upgrade: Upgrade) -> bool:
    token = checks.bearer(upgrade.get(checks.AUTHORIZATION))
    # ACS signs RS256 JWTs (three dot-separated parts); Vonage's are HS256.
    return (token is not None and token.count(".") == 2
            and checks.jwt_algorithm(token) != "HS256")


def _auto_codec(upgrade: Upgrade, options: CodecOptions) -> Codec:
    return AutoCodec(upgrade.first_values(),
                     lambda name: provider(name).codec(upgrade, options))


def _jambonz_subprotocol(offered: Sequence[str]) -> str | None:
    return JAMBONZ_SUBPROTOCOL if JAMBONZ_SUBPROTOCOL in offered else None


_SYNTH: Final = "streamsvc.replay.synth."

REGISTRY: Final[tuple[Provider, ...]] = (
    # On an auto route the upgrade's credential is looked for in this order.
    Provider(
        name="twilio", codec=lambda upgrade, options: TWILIO,
        settings=("auth_token", "auth_token_previous"), credential_env="TWILIO_AUTH_TOKEN",
        check=checks.twilio_problem, credential="X-Twilio-Signature",
        claims=lambda upgrade: bool(upgrade.all(checks.TWILIO_SIGNATURE)),
        context_on_wire=True, webhook="twiml", peer="mark", synth=_SYNTH + "twilio"),
    Provider(
        name="telnyx", codec=lambda upgrade, options: TelnyxCodec(),
        settings=("telnyx_stream_token",), credential_env="STREAMSVC_TELNYX_STREAM_TOKEN",
        check=checks.telnyx_problem, credential="x-telnyx-streaming-auth-token",
        claims=lambda upgrade: bool(upgrade.all(checks.TELNYX_TOKEN)),
        context_on_wire=True, webhook="texml", peer="mark:stream_id",
        synth=_SYNTH + "telnyx"),
    Provider(
        name="plivo", codec=lambda upgrade, options: PlivoCodec(),
        settings=("plivo_auth_token",), credential_env="PLIVO_AUTH_TOKEN",
        check=checks.plivo_problem, credential="X-Plivo-Signature-V3",
        claims=lambda upgrade: bool(upgrade.all(SIGNATURE_V3_HEADER)
                                    or upgrade.all(NONCE_HEADER)),
        context_on_wire=True, webhook="plivo", peer="checkpoint", synth=_SYNTH + "plivo"),
    Provider(
        name="exotel", codec=lambda upgrade, options: ExotelCodec(upgrade.query),
        settings=("exotel_basic_auth",), credential_env="STREAMSVC_EXOTEL_BASIC_AUTH",
        check=checks.exotel_problem, credential="Authorization: Basic",
        claims=lambda upgrade: _authorization_scheme(upgrade) == "basic",
        context_on_wire=True, webhook="exotel", peer="mark:stream_sid",
        synth=_SYNTH + "exotel"),
    Provider(
        name="acs",
        codec=lambda upgrade, options: AcsCodec(upgrade.first_values(),
                                                unmixed=options.unmixed),
        settings=("acs_audience",), credential_env="STREAMSVC_ACS_AUDIENCE",
        check=checks.acs_problem, credential="ACS bearer JWT (RS256)", claims=_acs_claims,
        context_on_wire=False, webhook=None, peer="none", synth=_SYNTH + "acs"),
    Provider(
        name="vonage", codec=lambda upgrade, options: VonageCodec(),
        settings=("vonage_signature_secret", "vonage_token"),
        credential_env="VONAGE_SIGNATURE_SECRET or STREAMSVC_VONAGE_TOKEN",
        check=checks.vonage_problem,
        credential="Authorization: Vonage JWT (HS256) or custom token",
        claims=lambda upgrade: bool(upgrade.all(checks.AUTHORIZATION)),
        context_on_wire=True, webhook="ncco", peer="notify", synth=_SYNTH + "vonage"),
    Provider(
        name="signalwire",
        codec=lambda upgrade, options: SignalWireCodec(
            l16_little_endian=options.l16_little_endian),
        settings=("signalwire_token",), credential_env="STREAMSVC_SIGNALWIRE_TOKEN",
        check=checks.signalwire_problem, credential="Authorization: Bearer",
        claims=lambda upgrade: _authorization_scheme(upgrade) == "bearer",
        context_on_wire=True, webhook="cxml", peer="mark", synth=_SYNTH + "twilio"),
    Provider(
        name="genesys",
        codec=lambda upgrade, options: GenesysCodec(upgrade.first_values(),
                                                    channels=options.channels),
        settings=("genesys_api_key",),
        credential_env="STREAMSVC_GENESYS_API_KEY and STREAMSVC_GENESYS_CLIENT_SECRET",
        check=checks.genesys_problem, credential="signature (RFC 9421) with X-API-KEY",
        claims=lambda upgrade: bool(upgrade.all(API_KEY_HEADER)
                                    and upgrade.all(ORGANIZATION_HEADER)),
        context_on_wire=True, webhook=None, peer="genesys", synth=_SYNTH + "genesys"),
    Provider(
        name="asterisk",
        codec=lambda upgrade, options: AsteriskCodec(upgrade.query),
        settings=("asterisk_basic_auth",), credential_env="STREAMSVC_ASTERISK_BASIC_AUTH",
        check=checks.asterisk_problem, credential="Authorization: Basic",
        claims=lambda upgrade: _authorization_scheme(upgrade) == "basic",
        context_on_wire=True, webhook=None, peer="asterisk", synth=_SYNTH + "asterisk",
        subprotocol=lambda offered: offered[0] if offered else None),
    Provider(
        name="jambonz",
        codec=lambda upgrade, options: JambonzCodec(streaming=options.streaming),
        settings=("jambonz_basic_auth",), credential_env="STREAMSVC_JAMBONZ_BASIC_AUTH",
        check=checks.jambonz_problem, credential="Authorization: Basic",
        claims=lambda upgrade: _authorization_scheme(upgrade) == "basic",
        context_on_wire=True, webhook=None, peer="jambonz", synth=_SYNTH + "jambonz",
        subprotocol=_jambonz_subprotocol),
    Provider(
        name="auto", codec=_auto_codec, settings=(), credential_env="", check=None,
        credential=None, claims=lambda upgrade: False,
        context_on_wire=True, webhook=None, peer="mark", synth=None,
        subprotocol=_jambonz_subprotocol),
)
_BY_NAME: Final = {row.name: row for row in REGISTRY}
# Every name a route may give, the default first (kept in this order for --help).
PROVIDERS: Final = ("twilio", "acs", "telnyx", "signalwire", "exotel", "plivo", "vonage",
                    "genesys", "asterisk", "jambonz", "auto")
AUTO: Final = _BY_NAME["auto"]


def provider(name: str) -> Provider:
    """The registry row of ``name``; ValueError for a name not in :data:`PROVIDERS`."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown provider {name!r}") from None


def codec_for(name: str, upgrade: Upgrade, options: CodecOptions = CodecOptions()) -> Codec:
    """A codec for one stream of provider ``name``, given its upgrade."""
    return provider(name).codec(upgrade, options)
