"""Session fixtures for the end-to-end tests against a real Open WebUI from PyPI.

- `ORP_E2E_VERSIONS` (default "0.12.4 0.6.28"): one server per version, shared by all tests.
- `ORP_SKIP_E2E=1`: skip every e2e test (the only way to skip them).
- `ORP_E2E_PIPE`: pipe file to install (default: the repo's openrouter_responses_pipe.py).
A venv that cannot be created is a failure, not a skip.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from openrouter_emulator import EmulatorThread
from owui_harness import OpenWebUIClient, OpenWebUIServer, ensure_venv, install_pipe

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VERSIONS = os.environ.get("ORP_E2E_VERSIONS", "0.12.4 0.6.28").split()
PIPE = Path(os.environ.get("ORP_E2E_PIPE") or ROOT / "openrouter_responses_pipe.py")
FUNCTION_ID = "openrouter"
API_KEY = "sk-or-emulator"
ADMIN = ("Admin", "admin@example.com", "e2e-admin-password")
MEMBER = ("Member", "member@example.com", "e2e-member-password")  # an ordinary (role user) account


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = os.environ.get("ORP_SKIP_E2E") == "1"
    for item in items:
        if HERE not in item.path.parents:
            continue
        item.add_marker(pytest.mark.e2e)
        if skip:
            item.add_marker(pytest.mark.skip(
                reason="!!! ORP_SKIP_E2E=1: real Open WebUI e2e tests NOT RUN !!!"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    rep = outcome.get_result()
    env = getattr(item, "funcargs", {}).get("owui")
    if rep.failed and isinstance(env, Owui):
        rep.sections.append((f"open-webui {env.version} log (tail)", env.server.log_tail(40)))


@dataclass
class Owui:
    version: str
    server: OpenWebUIServer
    client: OpenWebUIClient
    emulator: EmulatorThread
    member: OpenWebUIClient  # signed in as an ordinary user (role `user`)

    def model(self, openrouter_id: str) -> str:
        """The Open WebUI model id of an OpenRouter model served by the pipe."""
        return f"{FUNCTION_ID}.{openrouter_id}"

    @property
    def legacy(self) -> bool:
        return self.client.is_legacy


def wait_until_member_sees_models(admin: OpenWebUIClient, member: OpenWebUIClient,
                                  timeout: float = 60) -> None:
    """The pipe writes the model records in the background after its first listing."""
    deadline = time.monotonic() + timeout
    while True:
        wanted = {m["id"] for m in admin.list_models() if m["id"].startswith(FUNCTION_ID + ".")
                  and "._" not in m["id"]}
        seen = {m["id"] for m in member.list_models()}
        if wanted and wanted <= seen:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the member sees {len(seen & wanted)} of {len(wanted)} pipe models")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def emulator():
    emu = EmulatorThread()
    emu.start()
    yield emu
    emu.stop()


@pytest.fixture(scope="session", params=VERSIONS, ids=[f"owui-{v}" for v in VERSIONS])
def owui(request: pytest.FixtureRequest, emulator: EmulatorThread, tmp_path_factory):
    version = request.param
    try:
        ensure_venv(version)
    except Exception as e:  # no silent skip: the e2e suite is the point
        pytest.fail(f"could not create the open-webui {version} venv: {e}", pytrace=False)
    assert PIPE.exists(), f"pipe file not found: {PIPE}"
    log = tmp_path_factory.mktemp(f"owui-{version}") / "server.log"
    server = OpenWebUIServer(version, log_path=log)
    server.start()
    client = OpenWebUIClient(server.base_url)
    try:
        client.signup_admin(*ADMIN)
        # MODEL_ACCESS=all (issue #10): ordinary users see the pipe's models too
        install_pipe(client, PIPE, {"BASE_URL": emulator.base_url, "API_KEY": API_KEY,
                                    "MODEL_ACCESS": "all"}, function_id=FUNCTION_ID)
        member = client.add_user(*MEMBER)
        assert member.role == "user", member.role
        wait_until_member_sees_models(client, member)
        yield Owui(version, server, client, emulator, member)
    finally:
        client.close()
        server.stop()
