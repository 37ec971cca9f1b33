"""Screenshot a pipe chat in a real Open WebUI with headless Chromium (for docs/*.png).

    python tools/screenshot_chat.py --version 0.12.4 --model google/gemini-2.5-flash-image \
        --prompt "draw a red square" --out docs/image-owui-0.12.4.png

Starts Open WebUI from the cached venv with this repo's pipe talking to the local emulator,
makes the chat the way the browser does (socket.io), then opens it in Chromium (Chrome
DevTools Protocol over a websocket: the session token goes into localStorage as the web app
keeps it) and saves a PNG. Needs `chromium` on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from openrouter_emulator import EmulatorThread  # noqa: E402
from owui_harness import (  # noqa: E402
    OpenWebUIClient,
    OpenWebUIServer,
    free_port,
    install_pipe,
)


class CDP:
    """The few DevTools calls a screenshot needs."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws, self.n = ws, 0

    async def call(self, method: str, **params) -> dict:
        self.n += 1
        await self.ws.send_str(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == self.n:
                return msg.get("result") or {}


def shoot(base_url: str, token: str, path: str, out: Path, wait: float,
          size: tuple[int, int]) -> None:
    port = free_port()
    profile = tempfile.mkdtemp(prefix="chromium-")
    proc = subprocess.Popen(
        ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
         f"--window-size={size[0]},{size[1]}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        out.write_bytes(asyncio.run(_capture(port, base_url, token, path, wait, size)))
    finally:
        proc.terminate()
        proc.wait(10)


async def _capture(port: int, base_url: str, token: str, path: str, wait: float,
                   size: tuple[int, int]) -> bytes:
    async with aiohttp.ClientSession() as http:
        pages: list[dict] = []
        for _ in range(100):
            try:
                async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                    pages = [p for p in await r.json() if p["type"] == "page"]
            except aiohttp.ClientError:
                pass
            if pages:
                break
            await asyncio.sleep(0.2)
        async with http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            cdp = CDP(ws)
            await cdp.call("Page.enable")
            await cdp.call("Emulation.setDeviceMetricsOverride", width=size[0],
                           height=size[1], deviceScaleFactor=1, mobile=False)
            await cdp.call("Page.navigate", url=f"{base_url}/auth")
            await asyncio.sleep(3)
            await cdp.call("Runtime.evaluate",
                           expression=f"localStorage.setItem('token', {json.dumps(token)})")
            await cdp.call("Page.navigate", url=f"{base_url}{path}")
            await asyncio.sleep(wait)
            for _ in range(2):  # close a "what's new" dialog if one opened
                for kind in ("keyDown", "keyUp"):
                    await cdp.call("Input.dispatchKeyEvent", type=kind, key="Escape",
                                   code="Escape", windowsVirtualKeyCode=27)
            await asyncio.sleep(1.5)
            shot = await cdp.call("Page.captureScreenshot", format="png")
            return base64.b64decode(shot["data"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--version", default="0.12.4")
    ap.add_argument("--model", default="google/gemini-2.5-flash-image")
    ap.add_argument("--prompt", default="Draw a red square")
    ap.add_argument("--follow", default="", help="a second prompt in the same chat")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--wait", type=float, default=10.0)
    args = ap.parse_args(argv)
    with EmulatorThread() as emulator, OpenWebUIServer(args.version) as server:
        client = OpenWebUIClient(server.base_url)
        client.signup_admin("Admin", "admin@example.com", "screenshot-password")
        install_pipe(client, ROOT / "openrouter_responses_pipe.py",
                     {"BASE_URL": emulator.base_url, "API_KEY": "sk-or-emulator"},
                     function_id="openrouter")
        model = f"openrouter.{args.model}"
        chat = client.chat_ui(model, args.prompt)
        if args.follow:
            chat = client.chat_ui(model, args.follow, follow=chat)
        time.sleep(1)
        shoot(server.base_url, client.token, f"/c/{chat['id']}", args.out, args.wait,
              (1280, 900))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
