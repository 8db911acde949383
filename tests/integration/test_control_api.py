from pathlib import Path

import trio

from ipop_trio.net.control import MAX_REQUEST, reply_to_request, serve_control

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
