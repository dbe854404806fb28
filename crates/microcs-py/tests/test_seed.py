"""The original course project's snippets run exactly as written, in two separate scripts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import microcs
from conftest import PEERS, ServerFactory


def run_seed_client() -> str:
    done = subprocess.run(
        [sys.executable, str(PEERS / "seed_client.py")], capture_output=True, timeout=60, check=True
    )
    return done.stdout.decode()


def test_seed_server_and_seed_client(server: ServerFactory, runtime_dir: Path) -> None:
    server("seed", name="LIFE_GEN", script=PEERS / "seed_server.py")
    assert run_seed_client() == "Here is your data, you sent: Give me some data back!!\n"
    # The seed server is a text microcs server: any microcs client can call it too.
    with microcs.Client("LIFE_GEN", timeout=10) as client:
        assert client.request("héllo".encode()) == "Here is your data, you sent: héllo".encode()


def test_from_micro_server_import_micro_server(server: ServerFactory, runtime_dir: Path) -> None:
    server("seed", name="LIFE_GEN", script=PEERS / "seed_server_from_import.py")
    assert run_seed_client() == "!!kcab atad emos em eviG\n"


def test_seed_modules_are_callable_and_return_microcs_objects(runtime_dir: Path, name: str) -> None:
    import micro_client
    import micro_server
    from micro_client import micro_client as micro_client_fn
    from micro_server import micro_server as micro_server_fn

    server = micro_server_fn(lambda m: m.upper(), name)
    assert isinstance(server, microcs.Server)
    assert server.text
    with server:
        client = micro_client_fn(name)
        assert isinstance(client, microcs.Client)
        assert client.send_message("abc") == "ABC"
        client.close()
    # The modules themselves are callable, as `import micro_server; micro_server(...)` needs.
    assert callable(micro_server) and callable(micro_client)
