"""Run Open WebUI with this pipe installed, ready to chat in a browser.

    python tools/demo.py [--version 0.12.4] [--port 8080]

Without OPENROUTER_API_KEY the pipe talks to the local OpenRouter emulator; with it, to
https://openrouter.ai/api/v1. Data (users, chats, valves) persists in
${ORP_CACHE_DIR:-~/.cache/orp-owui}/demo-data/owui-<version>. Admin login: admin@example.com
and the password printed at start (override with ORP_DEMO_EMAIL / ORP_DEMO_PASSWORD).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from owui_harness import (  # noqa: E402
    OpenWebUIClient,
    OpenWebUIServer,
    cache_dir,
    ensure_venv,
    install_pipe,
)

OPENROUTER_URL = "https://openrouter.ai/api/v1"
FUNCTION_ID = "openrouter"


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is ok
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def on_sigterm(*_: object) -> None:
    raise KeyboardInterrupt  # shut down like Ctrl-C


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", default=os.environ.get("ORP_DEMO_VERSION", "0.12.4"),
                    help="open-webui version from PyPI (default 0.12.4)")
    ap.add_argument("--port", type=int, default=8080)
    args = ap.parse_args()
    email = os.environ.get("ORP_DEMO_EMAIL", "admin@example.com")
    password = os.environ.get("ORP_DEMO_PASSWORD", "openrouter-demo")
    if not port_is_free(args.port):
        print(f"port {args.port} is in use; pick another with --port", file=sys.stderr)
        return 2

    ensure_venv(args.version)
    emulator = None
    api_key = os.environ.get("OPENROUTER_API_KEY", "").strip()
    if api_key:
        base_url, backend = OPENROUTER_URL, "OpenRouter (real, OPENROUTER_API_KEY)"
    else:
        from openrouter_emulator import EmulatorThread  # needs aiohttp (project venv)

        emulator = EmulatorThread()
        base_url, api_key = emulator.start(), "sk-or-emulator"
        backend = f"local OpenRouter emulator at {base_url}"

    data_dir = cache_dir() / "demo-data" / f"owui-{args.version}"
    server = OpenWebUIServer(args.version, port=args.port, data_dir=data_dir,
                             log_path=data_dir / "server.log")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        print(f"starting open-webui {args.version} (log: {server.log_path}) ...", flush=True)
        server.start()
        client = OpenWebUIClient(server.base_url)
        client.signup_admin("Admin", email, password)
        # keep valves an admin changed in earlier runs; the backend must follow this run
        valves = {**(client.get_valves(FUNCTION_ID) if client.get_function(FUNCTION_ID) else {}),
                  "BASE_URL": base_url, "API_KEY": api_key}
        install_pipe(client, ROOT / "openrouter_responses_pipe.py", valves, FUNCTION_ID)
        models = [m["id"] for m in client.list_models() if m["id"].startswith(FUNCTION_ID + ".")]
        print(
            "\n"
            f"  Open WebUI {args.version}:  {server.base_url}\n"
            f"  login:     {email}\n"
            f"  password:  {password}\n"
            f"  backend:   {backend}\n"
            f"  models:    {len(models)} from the pipe (e.g. {', '.join(models[:3])})\n"
            f"  data:      {data_dir}\n"
            "\n  Press Ctrl-C to stop.\n",
            flush=True,
        )
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(1)
        print(f"open-webui exited unexpectedly:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        server.stop()
        if emulator is not None:
            emulator.stop()


if __name__ == "__main__":
    sys.exit(main())
