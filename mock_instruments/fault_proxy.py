"""A seeded fault-injecting TCP proxy between a driver and an emulator: the network, adapter or gateway a lab has.

It cuts each direction's byte stream into whole *messages* (``--framing scpi``: lines ending in LF, with IEEE
488.2 definite-length blocks ``#<n><len><bytes>`` skipped, so a block holding LF bytes stays whole; ``--framing
cobs``: frames delimited by 0x00, the FPGA protocol's serial framing) and, message by message, with the
probabilities given:

- ``drop``: the message is not forwarded (request or reply);
- ``delay``: it is held ``--delay-s`` seconds first (longer than the driver's timeout: a stall);
- ``duplicate``: a request is forwarded twice (a retransmitting adapter);
- ``duplicate-reply``: a reply is forwarded twice (a stray reply the driver must not take for the next answer);
- ``flip``: one random bit of the message is inverted;
- ``reset``: both connections are reset (RST) instead of forwarding it.

With ``--hold-client`` a lost upstream connection (the emulator killed and restarted) is re-opened behind the
client's back and the client's connection is kept: a VISA gateway or terminal server that hides the
instrument's restart. Only instance fencing can notice that.

Every decision draws from ``random.Random(f"{seed}:{connection}:{direction}")``, so a run is reproducible for a
given sequence of messages. Injected counts go to ``--stats FILE`` (JSON, replaced atomically after each fault)
and to standard output at exit. Loopback only unless ``--listen`` says otherwise. Imports neither the drivers
nor hil: a stranger on the wire.

    python -m eqprop_hil.mock_instruments.fault_proxy --target 127.0.0.1:5025 --framing scpi --drop 0.01 --seed 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import struct
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field

KINDS = ("drop", "delay", "duplicate", "duplicate_reply", "flip", "reset")


def split_scpi(buf: bytearray) -> list[bytes]:
    """Whole SCPI messages at the front of ``buf`` (removed from it): LF-terminated, blocks kept whole."""
    out, i, start = [], 0, 0
    n = len(buf)
    while i < n:
        c = buf[i]
        if c == 0x23 and i + 1 < n and 0x31 <= buf[i + 1] <= 0x39:  # '#1'..'#9': a definite-length block
            digits = buf[i + 1] - 0x30
            if i + 2 + digits > n:
                break  # header incomplete: wait for more bytes
            try:
                length = int(bytes(buf[i + 2:i + 2 + digits]))
            except ValueError:
                i += 1
                continue
            if i + 2 + digits + length > n:
                break
            i += 2 + digits + length
            continue
        if c == 0x0A:
            out.append(bytes(buf[start:i + 1]))
            start = i + 1
        i += 1
    del buf[:start]
    return out


def split_cobs(buf: bytearray) -> list[bytes]:
    """Whole 0x00-delimited frames at the front of ``buf`` (removed from it), each with its delimiter."""
    out, start = [], 0
    while True:
        end = buf.find(b"\x00", start)
        if end < 0:
            break
        out.append(bytes(buf[start:end + 1]))
        start = end + 1
    del buf[:start]
    return out


@dataclass
class Rates:
    drop: float = 0.0
    delay: float = 0.0
    duplicate: float = 0.0
    duplicate_reply: float = 0.0
    flip: float = 0.0
    reset: float = 0.0
    delay_s: float = 2.0

    def draw(self, rng: random.Random, request: bool) -> str | None:
        """At most one fault per message; kinds that make no sense in this direction are skipped."""
        for kind in KINDS:
            if kind == "duplicate" and not request or kind == "duplicate_reply" and request:
                continue
            p = getattr(self, kind)
            if p and rng.random() < p:
                return kind
        return None


@dataclass
class Proxy:
    target: tuple[str, int]
    framing: str
    rates: Rates
    seed: int
    hold_client: bool = False
    stats_path: str = ""
    injected: Counter = field(default_factory=Counter)
    connections: int = 0
    messages: Counter = field(default_factory=Counter)
    enabled: bool = True

    def split(self, buf: bytearray) -> list[bytes]:
        return split_scpi(buf) if self.framing == "scpi" else split_cobs(buf)

    def record(self, kind: str, direction: str) -> None:
        self.injected[f"{kind}"] += 1
        self.injected[f"{kind}:{direction}"] += 1
        self.write_stats()

    def summary(self) -> dict:
        return {"injected": dict(self.injected), "connections": self.connections, "messages": dict(self.messages)}

    def write_stats(self) -> None:
        if not self.stats_path:
            return
        d = os.path.dirname(os.path.abspath(self.stats_path))
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".proxy-stats.")
        with os.fdopen(fd, "w") as f:
            json.dump(self.summary(), f)
        os.replace(tmp, self.stats_path)

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(client_w)
            return
        state = {"up": (up_r, up_w), "closed": False}
        rng_req = random.Random(f"{self.seed}:{conn}:request")
        rng_rep = random.Random(f"{self.seed}:{conn}:reply")

        async def reopen() -> bool:
            """--hold-client: the instrument went away; connect to whatever answers on its address again."""
            for _ in range(400):
                try:
                    state["up"] = await asyncio.open_connection(*self.target)
                    self.injected["upstream_reopened"] += 1
                    asyncio.ensure_future(pump_replies())
                    return True
                except OSError:
                    await asyncio.sleep(0.05)
            return False

        def reset_all() -> None:
            state["closed"] = True
            _reset(client_w)
            _reset(state["up"][1])

        async def forward(writer: asyncio.StreamWriter, msg: bytes, kind: str | None, direction: str) -> bool:
            if kind:
                self.record(kind, direction)
            if kind == "drop":
                return True
            if kind == "reset":
                reset_all()
                return False
            if kind == "delay":
                await asyncio.sleep(self.rates.delay_s)
            if kind == "flip":
                b = bytearray(msg)
                pos = rng_req.randrange(len(b) * 8) if direction == "request" else rng_rep.randrange(len(b) * 8)
                b[pos // 8] ^= 1 << (pos % 8)
                msg = bytes(b)
            writer.write(msg)
            if kind in ("duplicate", "duplicate_reply"):
                writer.write(msg)
            await writer.drain()
            return True

        async def pump_replies() -> None:
            reader, _ = state["up"]
            buf = bytearray()
            while not state["closed"]:
                try:
                    data = await reader.read(65536)
                except OSError:
                    data = b""
                if not data:
                    if self.hold_client and not state["closed"] and reader is state["up"][0]:
                        await reopen()
                        return
                    reset_all()
                    return
                buf += data
                for msg in self.split(buf):
                    self.messages["reply"] += 1
                    kind = self.rates.draw(rng_rep, request=False) if self.enabled else None
                    try:
                        if not await forward(client_w, msg, kind, "reply"):
                            return
                    except OSError:
                        reset_all()
                        return

        asyncio.ensure_future(pump_replies())
        buf = bytearray()
        try:
            while not state["closed"]:
                data = await client_r.read(65536)
                if not data:
                    break
                buf += data
                for msg in self.split(buf):
                    self.messages["request"] += 1
                    kind = self.rates.draw(rng_req, request=True) if self.enabled else None
                    try:
                        if not await forward(state["up"][1], msg, kind, "request"):
                            return
                    except OSError:
                        if self.hold_client and await reopen():
                            continue  # the message is lost with the old connection, as on a real gateway
                        reset_all()
                        return
        except OSError:  # the client's side went away mid-read: close both ends below, as a gateway does
            pass
        finally:
            if not state["closed"]:
                state["closed"] = True
                for w in (client_w, state["up"][1]):
                    w.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a crashed peer or a middlebox does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed by the peer: a plain close is all that is left
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host, int(port)


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a probability per message must be in [0, 1]")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eqprop_hil.mock_instruments.fault_proxy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", type=_address, default=("127.0.0.1", 0), help="HOST:PORT (default 127.0.0.1:0)")
    p.add_argument("--target", type=_address, required=True, help="the emulator's HOST:PORT")
    p.add_argument("--framing", choices=("scpi", "cobs"), required=True)
    for kind in KINDS:
        p.add_argument(f"--{kind.replace('_', '-')}", type=_rate, default=0.0, metavar="P",
                       help=f"probability per message of '{kind}'")
    p.add_argument("--delay-s", type=float, default=2.0, help="how long a delayed message is held (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hold-client", action="store_true", help="keep the client's connection when the target goes")
    p.add_argument("--stats", default="", help="JSON file of injected counts, replaced after every fault")
    args = p.parse_args(argv)
    rates = Rates(**{k: getattr(args, k) for k in KINDS}, delay_s=args.delay_s)
    proxy = Proxy(target=args.target, framing=args.framing, rates=rates, seed=args.seed,
                  hold_client=args.hold_client, stats_path=args.stats)

    async def serve() -> None:
        server = await asyncio.start_server(proxy.handle, *args.listen)
        host, port = server.sockets[0].getsockname()[:2]
        print(f"{host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        # SIGUSR1 / SIGUSR2: faults off / on (a campaign's fault-free set-up and final read-back)
        loop.add_signal_handler(signal.SIGUSR1, lambda: setattr(proxy, "enabled", False))
        loop.add_signal_handler(signal.SIGUSR2, lambda: setattr(proxy, "enabled", True))
        async with server:
            await stop.wait()

    asyncio.run(serve())
    proxy.write_stats()
    print(json.dumps(proxy.summary()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
