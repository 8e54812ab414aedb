import asyncio, sys, uvloop
REPLY = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 20\r\n\r\n" + b'{"scores":[0.5,0.5]}'
class P(asyncio.Protocol):
    def connection_made(self, t): self.t = t; self.buf = b""
    def data_received(self, data):
        self.buf += data
        while True:
            h = self.buf.find(b"\r\n\r\n")
            if h < 0: return
            head = self.buf[:h].lower(); n = 0
            i = head.find(b"content-length:")
            if i >= 0: n = int(head[i+15:].split(b"\r\n")[0])
            if len(self.buf) < h + 4 + n: return
            self.buf = self.buf[h+4+n:]
            self.t.write(REPLY)
async def main():
    s = await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[1]))
    await s.serve_forever()
uvloop.run(main())
