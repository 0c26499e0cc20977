"""Settings: precedence defaults < TOML < env < CLI, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamsvc.builtins.log import LogHandler
from streamsvc.cli.reference import MEANINGS, with_settings_table
from streamsvc.config import SETTINGS, Settings, load_settings
from streamsvc.exceptions import ConfigError


def toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "streamsvc.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_defaults_serve_stream_and_connect_with_the_log_handler() -> None:
    settings = load_settings(env={})
    assert Settings() == settings
    assert ("127.0.0.1", 8080, 64 * 1024) == (settings.host, settings.port,
                                               settings.max_message_bytes)
    stream, connect = settings.routes
    assert ("/stream", False, LogHandler) == (stream.path, stream.bidirectional,
                                              stream.handlers[0].factory)
    assert ("/connect", True) == (connect.path, connect.bidirectional)


def test_every_setting_has_a_toml_key_an_env_var_and_a_flag() -> None:
    for setting in SETTINGS:
        assert "STREAMSVC_" + setting.key.upper() == setting.env[0]
        assert setting.flag == "--" + setting.key.replace("_", "-")
        assert getattr(Settings(), setting.key) == setting.default


def test_precedence_is_defaults_then_toml_then_env_then_cli(tmp_path: Path) -> None:
    path = toml(tmp_path, '[server]\nport = 9000\nhost = "0.0.0.0"\nmax_connections = 5\n'
                          "insecure = true\n")
    assert 9000 == load_settings(config_path=path, env={}).port
    env = {"PORT": "9100", "STREAMSVC_MAX_CONNECTIONS": "7"}
    settings = load_settings(config_path=path, env=env)
    assert (9100, "0.0.0.0", 7) == (settings.port, settings.host, settings.max_connections)
    settings = load_settings(config_path=path, env=env, cli={"port": "9200", "host": None})
    assert (9200, "0.0.0.0") == (settings.port, settings.host)


def test_streamsvc_port_wins_over_the_platforms_port() -> None:
    assert 9300 == load_settings(env={"PORT": "9100", "STREAMSVC_PORT": "9300"}).port


def test_config_file_may_come_from_the_environment(tmp_path: Path) -> None:
    path = toml(tmp_path, "[server]\nport = 9400\n")
    assert 9400 == load_settings(env={"STREAMSVC_CONFIG": path}).port


def test_routes_and_handler_options_come_from_toml(tmp_path: Path) -> None:
    path = toml(tmp_path, """
[[routes]]
path = "/voice"
handlers = ["log", "tests.test_handlers:Recording"]
bidirectional = true

[handlers."tests.test_handlers:Recording"]
calls = []
""")
    (route,) = load_settings(config_path=path, env={}).routes
    assert ("/voice", True) == (route.path, route.bidirectional)
    assert ["log", "tests.test_handlers:Recording"] == [h.name for h in route.handlers]
    assert {"calls": []} == route.handlers[1].options


@pytest.mark.parametrize(
    ("text", "env", "key"),
    [
        pytest.param("[server]\nport = 'eighty'\n", {}, "server.port", id="toml-type"),
        pytest.param("[server]\nprot = 80\n", {}, "server.prot", id="toml-unknown-key"),
        pytest.param("[sever]\n", {}, "sever", id="toml-unknown-table"),
        pytest.param("", {"PORT": "x"}, "PORT", id="env-type"),
        pytest.param("", {"STREAMSVC_LOG_FORMAT": "xml"}, "STREAMSVC_LOG_FORMAT",
                     id="env-choice"),
        pytest.param("", {"STREAMSVC_MAX_CONNECTIONS": "0"}, "STREAMSVC_MAX_CONNECTIONS",
                     id="env-minimum"),
        pytest.param("[[routes]]\npath = 'stream'\n", {}, "routes[0].path", id="route-path"),
        pytest.param("[[routes]]\npath = '/s'\nhandlers = ['nope']\n", {},
                     "routes[0].handlers", id="route-handler"),
        pytest.param("[[routes]]\npath = '/s'\nbidirectional = 'yes'\n", {},
                     "routes[0].bidirectional", id="route-bidirectional"),
        pytest.param("[[routes]]\npath = '/s'\n[[routes]]\npath = '/s'\n", {},
                     "routes.path", id="route-duplicate"),
        pytest.param("[[routes]]\npath = '/s'\nhandlers = ['log']\n[handlers.log]\nx = 1\n",
                     {}, "routes[0].handlers", id="handler-option"),
        pytest.param("port = = 1", {}, "--config", id="not-toml"),
        pytest.param("", {"STREAMSVC_PORT": "99999"}, "STREAMSVC_PORT", id="port-too-large"),
        pytest.param("[server]\nport = -1\n", {}, "server.port", id="port-negative"),
        pytest.param("[[routes]]\npath = '/s'\n[[routes]]\npath = '/healthz'\n", {},
                     "routes[1].path", id="route-on-a-probe"),
        pytest.param("[[routes]]\npath = '/metrics'\n", {}, "routes[0].path",
                     id="route-on-metrics"),
        pytest.param("[[routes]]\npath = '/twiml/x'\n", {}, "routes[0].path",
                     id="route-under-the-webhook"),
        pytest.param("[[routes]]\npath = '/stream-status'\n", {}, "status_callback_path",
                     id="route-on-the-status-callback"),
        pytest.param("", {"STREAMSVC_WEBHOOK_PATH": "/readyz"}, "webhook_path",
                     id="webhook-on-a-probe"),
    ],
)
def test_bad_settings_fail_naming_the_key(tmp_path: Path, text: str, env: dict[str, str],
                                          key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(config_path=toml(tmp_path, text), env=env)
    assert key == caught.value.key


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(config_path=str(tmp_path / "absent.toml"), env={})


ROOT = Path(__file__).parent.parent
# The README and every docs page: the places a reader copies settings and examples from.
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_the_configuration_page_documents_every_setting() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    for setting in SETTINGS:
        assert f"| `{setting.key}`" in page, setting.key
        assert f"`{setting.flag}`" in page, setting.flag
        assert f"`{setting.env[0]}`" in page, setting.env[0]


def test_the_settings_reference_is_what_the_code_generates() -> None:
    """docs/configuration.md's table comes from SETTINGS and streamsvc/cli/reference.py:
    on a difference, run `python -m streamsvc.cli.reference` (after editing those)."""
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert {setting.key for setting in SETTINGS} == set(MEANINGS)
    assert with_settings_table(page) == page


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_toml_example_in_the_readme_and_the_docs_loads(
        page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The reader's own handler package that the examples name.
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "handlers.py").write_text(
        "class Transcriber:\n"
        "    def __init__(self, language: str) -> None:\n"
        "        self.language = language\n"
        "class Greeter:\n"
        "    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    text_of_page = page.read_text(encoding="utf-8")
    blocks = [block.split("```", 1)[0] for block in text_of_page.split("```toml\n")[1:]]
    for text in blocks:
        # The credentials the README sets beside its examples, in the environment.
        settings = load_settings(config_path=toml(tmp_path, text), env={
            "TWILIO_AUTH_TOKEN": "12345", "STREAMSVC_PUBLIC_URL": "wss://voice.example.com",
            "STREAMSVC_TELNYX_STREAM_TOKEN": "t", "STREAMSVC_SIGNALWIRE_TOKEN": "t",
            "STREAMSVC_EXOTEL_BASIC_AUTH": "k:t", "PLIVO_AUTH_TOKEN": "t",
            "VONAGE_SIGNATURE_SECRET": "s"})
        assert settings.routes


def test_a_webhook_path_without_its_slash_says_so() -> None:
    with pytest.raises(ConfigError, match="must start with '/', like '/twiml'") as caught:
        load_settings(env={}, cli={"webhook_path": "twiml"})
    assert "webhook_path" == caught.value.key


@pytest.mark.parametrize("public_url", ["wss://api.example.com/voice",
                                        "https://api.example.com/voice/", "http://127.0.0.1:8080"])
def test_public_url_may_be_https_and_carry_a_path_prefix(public_url: str) -> None:
    settings = load_settings(env={"STREAMSVC_PUBLIC_URL": public_url})
    assert public_url.rstrip("/").split("://")[1] == settings.public_base("ws").split("://")[1]
    assert ("/voice/stream" if "/voice" in public_url else "/stream") == (
        settings.public_prefix + "/stream")
    assert "/stream" == settings.local_path(settings.public_prefix + "/stream")
