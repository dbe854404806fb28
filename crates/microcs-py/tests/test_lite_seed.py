"""The original course project's two snippets, run with nothing but the three copied files.

``microcs_lite.py``, ``micro_server.py`` and ``micro_client.py`` are copied into an empty
directory, which is the only thing on ``PYTHONPATH``; the interpreter runs with ``-S`` (no
site-packages, so neither the compiled package nor anything else installed is visible) and is
the oldest supported Python when one is found (3.9), else this one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import microcs
from conftest import LITE, PEERS, _default_sigint, stop_process, wait_for_service


def oldest_python() -> str:
    """Python 3.9 if this machine has one (PATH, or pyenv's versions), else this interpreter."""
    found = [shutil.which("python3.9") or ""]
    found += sorted(str(p) for p in (Path.home() / ".pyenv" / "versions").glob("3.9*/bin/python3.9"))
    for candidate in filter(None, found):
        ok = subprocess.run([candidate, "-S", "-c", "import sys; assert sys.version_info[:2] == (3, 9)"], capture_output=True)
        if ok.returncode == 0:
            return candidate
    return sys.executable


@pytest.fixture
def copied(tmp_path: Path) -> Path:
    d = tmp_path / "just-the-files"
    d.mkdir()
    for f in ("microcs_lite.py", "micro_server.py", "micro_client.py"):
        shutil.copy(LITE / f, d / f)
    return d


def run_isolated(script: Path, copied: Path, python: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(copied))
    return subprocess.Popen(
        [python, "-S", str(script)], cwd=copied, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=_default_sigint,
    )


@pytest.mark.parametrize("script,reply", [
    ("seed_server.py", "Here is your data, you sent: Give me some data back!!\n"),
    ("seed_server_from_import.py", "!!kcab atad emos em eviG\n"),
])
def test_the_seed_snippets_run_on_the_copied_files_alone(copied: Path, runtime_dir: Path, script: str, reply: str) -> None:
    python = oldest_python()
    # Nothing else is importable: not the compiled package, not the repository's python/.
    probe = subprocess.run([python, "-S", "-c", "import microcs"], env=dict(os.environ, PYTHONPATH=str(copied)), capture_output=True, text=True)
    assert "No module named 'microcs'" in probe.stderr
    server = run_isolated(PEERS / script, copied, python)
    try:
        wait_for_service("LIFE_GEN", runtime_dir, server)
        client = run_isolated(PEERS / "seed_client.py", copied, python)
        out, err = client.communicate(timeout=60)
        assert (client.returncode, out.decode()) == (0, reply), err.decode()
        # The pure seed server is a text microcs server: the compiled client calls it too.
        with microcs.Client("LIFE_GEN", timeout=10) as c:
            assert c.send_message("héllo") in ("Here is your data, you sent: héllo", "olléh")
        # Ctrl-C stops it and frees the name.
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=20)
        assert b"KeyboardInterrupt" in err
        assert not (runtime_dir / "LIFE_GEN.sock").exists() and not (runtime_dir / "LIFE_GEN.lock").exists()
    finally:
        stop_process(server)
