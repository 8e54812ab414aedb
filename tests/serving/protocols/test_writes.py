"""CoalescedWrites over a real loopback connection: a turn's small writes leave together and in order, a large one
reaches the transport at once (so its high-water mark, and a streaming response's wait for a slow reader, still
work), and closing sends what is pending first."""

import asyncio

from uembed.serving.protocols.writes import FLUSH_AT_BYTES, CoalescedWrites


class Counting(asyncio.Protocol):
    """The server side: its transport wrapped, the real transport's writes and pauses counted."""

    def __init__(self) -> None:
        self.writes, self.paused = [], 0
        self.connected = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        real_write = transport.write

        def counted(data) -> None:
            self.writes.append(bytes(data))
            real_write(data)

        transport.write = counted  # the real transport's method, counted: what reaches the socket
        self.transport = CoalescedWrites(transport, asyncio.get_running_loop())
        self.connected.set_result(None)

    def pause_writing(self) -> None:
        self.paused += 1


async def connected() -> tuple[Counting, asyncio.StreamReader, asyncio.StreamWriter, asyncio.Server]:
    server_side = Counting()
    server = await asyncio.get_running_loop().create_server(lambda: server_side, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    await server_side.connected
    return server_side, reader, writer, server


def test_a_turns_small_writes_leave_as_one_in_order():
    async def run():
        side, reader, writer, server = await connected()
        for part in (b"HTTP/1.1 200 OK\r\n", b"content-length: 5\r\n\r\n", b"hello"):
            side.transport.write(part)
        assert side.writes == []  # held for the turn
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert side.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"]
        side.transport.write(b"last")
        side.transport.close()  # pending bytes go first
        assert await reader.read() == b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhellolast"
        writer.close()
        server.close()

    asyncio.run(run())


def test_large_writes_reach_the_transport_in_the_same_turn():
    async def run():
        side, reader, writer, server = await connected()
        side.transport.write(b"head")
        chunk = b"x" * FLUSH_AT_BYTES
        for _ in range(256):  # 16 MiB in one turn to a client that reads nothing yet
            side.transport.write(chunk)
        # each chunk went to the transport at once (the head before it), none piled up here: the transport's
        # high-water mark was reached within the turn, and the protocol was told to pause
        assert side.writes[0] == b"head" and len(side.writes) == 257 and side.transport.pending == []
        assert side.paused >= 1
        side.transport.write(b"tail")
        side.transport.close()
        received = await reader.read()
        assert received == b"head" + chunk * 256 + b"tail"
        writer.close()
        server.close()

    asyncio.run(run())
