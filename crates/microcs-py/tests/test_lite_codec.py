"""The pure-Python codec against docs/PROTOCOL.md, and what makes microcs_lite copyable.

The golden examples are read straight out of the protocol document (as
crates/microcs/src/proto/tests.rs does), so the Rust and the Python codecs are held to the same
bytes: every ``golden`` block decodes to the fields below and re-encodes to itself, every
``reject`` block fails with its status, every ``incomplete`` block asks for the stated bytes.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

import microcs
import microcs_lite as lite
from conftest import LITE, ROOT

PROTOCOL = ROOT / "docs" / "PROTOCOL.md"

#: name -> (kind, flags, id, status, deadline_ms, method, payload); as tests.rs's table.
GOLDEN = {
    "hello": (lite.HELLO, 0, 0, 0, 0, b"", bytes.fromhex("01000000")),
    "hello-ack": (
        lite.HELLO_ACK, 0, 0, 0, 0, b"",
        bytes.fromhex("0100000000000080000010920008") + b"LIFE_GEN" + bytes.fromhex("00000001"),
    ),
    "request-method": (lite.REQUEST, 0, 7, 0, 250, b"step", b"hello"),
    "request-default": (lite.REQUEST, 0, 1, 0, 30000, b"", b"Give me some data back!!"),
    "request-builtin": (lite.REQUEST, 0, 2, 0, 30000, b"$ping", b""),
    "reply": (lite.REPLY, 0, 7, 0, 0, b"", b"world"),
    "error-handler": (lite.ERROR, 0, 7, 500, 0, b"", b"board is empty"),
    "error-request": (lite.ERROR, 3, 9, 404, 0, b"", b"service 'LIFE_GEN' has no method 'jump' (it has: step)"),
    "error-connection": (
        lite.ERROR, 3, 0, 503, 0, b"",
        b"service 'LIFE_GEN' is at its limit of 1024 connections; try again later",
    ),
    "cancel": (lite.CANCEL, 0, 7, 0, 0, b"", b""),
    "ping": (lite.PING, 0, 3, 0, 0, b"", b"hi"),
    "pong": (lite.PONG, 0, 3, 0, 0, b"", b"hi"),
    "stream-request": (lite.REQUEST, lite.FLAG_STREAM, 9, 0, 0, b"run", b"3"),
    "credit": (lite.CREDIT, 0, 9, 0, 0, b"", bytes.fromhex("0000004000100000")),
    "item": (lite.ITEM, 0, 9, 0, 0, b"", b"#.#"),
    "stream-end": (lite.REPLY, 0, 9, 0, 0, b"", b""),
    # Shared memory (§ 18): microcs_lite never asks for it, but decodes the frames.
    "hello-shm": (lite.HELLO, 0, 0, 0, 0, b"", bytes.fromhex("0100000000000002")),
    "hello-ack-shm": (
        lite.HELLO_ACK, 0, 0, 0, 0, b"",
        bytes.fromhex("0100000000000080000010920008") + b"LIFE_GEN" + bytes.fromhex("0000000300040000"),
    ),
}
#: name -> status of the Error that answers it.
REJECT = {
    "too-short": 400,
    "giant-length": 413,
    "http": 413,
    "version-2": 505,
    "method-too-long": 400,
    "method-past-end": 400,
    "payload-over-limit": 413,
}
INCOMPLETE = {"request-first-10": 24, "request-header-only": 33}


def blocks() -> list[tuple[str, str, int, bytes]]:
    """Every ```hex WHAT=NAME [limit=N]``` block of PROTOCOL.md: (what, name, limit, bytes)."""
    found = []
    text = PROTOCOL.read_text()
    for m in re.finditer(r"^```hex (golden|reject|incomplete)=(\S+)(?: limit=(\d+))?\n(.*?)^```", text, re.M | re.S):
        hexdigits = "".join(line.split("#", 1)[0] for line in m.group(4).splitlines())
        limit = int(m.group(3)) if m.group(3) else lite.DEFAULT_MAX_PAYLOAD
        found.append((m.group(1), m.group(2), limit, bytes.fromhex(hexdigits)))
    return found


def test_the_document_has_exactly_the_examples_checked_here() -> None:
    names = {(what, name) for what, name, _, _ in blocks()}
    expected = {("golden", n) for n in GOLDEN} | {("reject", n) for n in REJECT} | {("incomplete", n) for n in INCOMPLETE}
    assert names == expected


@pytest.mark.parametrize("what,name,limit,wire", blocks(), ids=lambda v: v if isinstance(v, str) else "")
def test_golden_example(what: str, name: str, limit: int, wire: bytes) -> None:
    if what == "golden":
        decoded = lite.decode(wire, limit)
        assert isinstance(decoded, tuple), decoded
        frame, used = decoded
        assert used == len(wire)
        assert tuple(frame) == GOLDEN[name]
        assert lite.encode(frame.kind, frame.id, frame.payload, frame.method, frame.flags, frame.status, frame.deadline_ms) == wire
        # Every prefix asks for more bytes (a frame split over reads is not an error), and a
        # frame followed by the next one's first bytes still decodes alone.
        for cut in range(len(wire)):
            assert isinstance(lite.decode(wire[:cut], limit), int), cut
        assert lite.decode(wire + wire[:7], limit) == decoded
    elif what == "reject":
        with pytest.raises(lite.DecodeError) as e:
            lite.decode(wire, limit)
        assert e.value.status == REJECT[name], e.value
        assert isinstance(e.value, lite.ProtocolError)
    else:
        assert lite.decode(wire, limit) == INCOMPLETE[name]


def test_rejections_say_why_as_the_rust_decoder_does() -> None:
    with pytest.raises(lite.DecodeError, match="frame of 4294967295 bytes is over the limit of 16777216 bytes"):
        lite.decode(b"\xff\xff\xff\xff", lite.DEFAULT_MAX_PAYLOAD)
    with pytest.raises(lite.DecodeError, match="shorter than the 20-byte header"):
        lite.decode(b"\x00\x00\x00\x03\x01\x02\x03", lite.DEFAULT_MAX_PAYLOAD)


def test_deadline_ms_rounds_up_to_at_least_one_and_saturates() -> None:
    assert lite._deadline_ms(0.0015) == 2
    assert lite._deadline_ms(0.25) == 250
    assert lite._deadline_ms(0.0) == 1
    assert lite._deadline_ms(-3.0) == 1
    assert lite._deadline_ms(30.0) == 30000
    assert lite._deadline_ms(1e12) == 2**32 - 1


def test_names_follow_the_registry_rules() -> None:
    for ok in ["LIFE_GEN", "life-gen", "org.example.solver", "a", "v2_api", "x" * 64]:
        assert lite.check_name(ok) == ok
    for bad in ["", "../x", "a/b", "a b", ".hidden", "a..b", "trailing.", "-flag", "é", "a\0b", "x" * 65]:
        with pytest.raises(lite.InvalidName, match="a name is dot-separated tokens"):
            lite.check_name(bad)
    for ok_method in ["step", "$ping", "a.b-c_d"]:
        lite.check_method(ok_method)
    for bad_method in ["", "$", "not a method", "é", "m" * 65]:
        with pytest.raises(lite.InvalidName):
            lite.check_method(bad_method)


def test_runtime_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROCS_RUNTIME_DIR", "/tmp/explicit")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/4242")
    assert lite.runtime_dir() == "/tmp/explicit" == microcs.runtime_dir()
    monkeypatch.setenv("MICROCS_RUNTIME_DIR", "")
    assert lite.runtime_dir() == "/run/user/4242/microcs" == microcs.runtime_dir()
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert lite.runtime_dir() == f"/tmp/microcs-{__import__('os').geteuid()}" == microcs.runtime_dir()


def test_same_exception_names_and_hierarchy_as_the_compiled_package() -> None:
    from microcs import _errors

    for name in _errors.__all__:
        compiled, pure = getattr(_errors, name), getattr(lite, name)
        assert [c.__name__ for c in pure.__mro__] == [c.__name__ for c in compiled.__mro__], name
        assert name in lite.__all__
    taken = lite.NameTaken("x")
    assert taken.owner_pid is None and taken.may_have_run is False
    remote = lite.RemoteError("send a board", code=400)
    assert (remote.code, remote.message, str(remote)) == (400, "send a board", "send a board")
    assert lite.RemoteError().code == 500


FILES = ["microcs_lite.py", "micro_server.py", "micro_client.py"]


@pytest.mark.parametrize("file", FILES)
def test_only_the_standard_library_is_imported(file: str) -> None:
    tree = ast.parse((LITE / file).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            modules = [node.module or ""]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            pytest.fail(f"{file}: dynamic import at line {node.lineno}")
        else:
            continue
        for m in modules:
            top = m.split(".")[0]
            assert top in sys.stdlib_module_names or top in ("__future__", "microcs_lite"), f"{file} imports {m}"


def test_the_files_parse_as_python_3_9() -> None:
    for file in FILES:
        ast.parse((LITE / file).read_text(), feature_version=(3, 9))
