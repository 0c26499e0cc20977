"""What a user's tools and a Procfile platform need of the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_a_users_strict_mypy_accepts_the_public_api(tmp_path: Path) -> None:
    user = tmp_path / "handlers.py"
    user.write_text(
        "from streamsvc import AsyncHandler, Handler\n"
        "from streamsvc.live import LiveSession\n\n\n"
        "class Greeter(Handler):\n"
        "    def on_start(self, session: LiveSession) -> None:\n"
        "        session.send_audio(b'\\xff' * 160)\n\n\n"
        "class Uploader(AsyncHandler):\n"
        "    async def on_start(self, session: LiveSession) -> None:\n"
        "        print(session.custom_parameters.get('customerId'))\n")
    done = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                           str(user)], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert 0 == done.returncode, done.stdout


def test_a_buildpack_installs_the_service_from_requirements_txt() -> None:
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert ["."] == [line for line in lines if line and not line.startswith("#")]
    assert "web: python -m streamsvc serve" in (ROOT / "Procfile").read_text()


def test_the_license_the_metadata_names_is_there() -> None:
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert 'license = "MIT"' in (ROOT / "pyproject.toml").read_text()
