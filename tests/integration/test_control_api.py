import socket
from pathlib import Path

import pytest
import trio

from ipop_trio.net.control import (
    MAX_REQUEST,
    ControlSocket,
    ControlSocketTaken,
    reply_to_request,
    serve_control,
)

HANDLERS = {"status": lambda req: {"ok": True}}


def test_requests_are_validated() -> None:
    assert reply_to_request(b'{"cmd": "status"}', HANDLERS) == {"ok": True}
    for bad in (
        b"",
        b"nope",
        b"[1]",
        b'{"cmd": 3}',
        b'{"cmd": "reboot"}',
        b"\xff\xfe",
        b"x" * (MAX_REQUEST + 1),
        b"[" * (MAX_REQUEST - 1),  # nesting deeper than the JSON parser's recursion limit
    ):
        assert "error" in reply_to_request(bad, HANDLERS)


async def test_serves_over_a_unix_socket_and_removes_it(tmp_path: Path) -> None:
    path = tmp_path / "ctl" / "node.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, HANDLERS)
        assert path.is_socket() and (path.stat().st_mode & 0o777) == 0o600
        stream = await trio.open_unix_socket(str(path))
        async with stream:
            await stream.send_all(b'{"cmd": "status"}\n')
            reply = b""
            while not reply.endswith(b"\n"):
                reply += await stream.receive_some(1024)
        assert reply == b'{"ok": true}\n'
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_a_socket_a_live_node_serves_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.sock"
    live = {"status": lambda req: {"node": {"name": "alpha", "pid": 4321}}}
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, path, live)
        # The claim asks the socket who is there (a blocking query): off the Trio thread.
        with pytest.raises(ControlSocketTaken, match=r"live node \(node alpha, pid 4321\)"):
            await trio.to_thread.run_sync(ControlSocket, path)
        assert path.is_socket()  # still alpha's
        nursery.cancel_scope.cancel()


def test_a_stale_socket_is_replaced_and_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, as after a SIGKILL: nobody answers
    ControlSocket(path).close()
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(ControlSocketTaken, match="exists and is not a socket"):
        ControlSocket(path)
    assert path.read_text() == "not a socket"


def test_closing_removes_only_our_own_socket(tmp_path: Path) -> None:
    path = tmp_path / "node.sock"
    first = ControlSocket(path)
    path.unlink()  # someone removed it, and another node then bound the same path
    second = ControlSocket(path)
    first.close()
    assert path.is_socket()
    second.close()
    assert not path.exists()
