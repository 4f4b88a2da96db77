"""Multi-node tensor parallelism: the relay that carries the engine's commands to the other nodes.

The engine core runs on node 0 only. Its executor puts every command (one tag byte, then the
payload) on node 0's shared-memory ring and sends the same bytes, in the same order, over one TCP
connection to each other node, where `albireo worker-node` puts them on that node's ring. Each
node sends back what the engine waits for from its workers (the start-up "ok", the replies to
"available KV blocks" and "init KV cache") and its failures; "collect" is answered by rank 0, on
node 0. A node's relay stops its workers and exits when node 0 says shutdown or disconnects.

    node 0:  EngineCore -> MultiProcExecutor -> ring -> ranks 0 .. r-1
                                     \\-> RemoteNodes == TCP ==> node k: run_worker_node -> ring -> ranks k*r ..

Node 0 listens on master_port + 1 (torch.distributed's rendezvous has master_port) and each other
node connects to it, introducing itself with its node rank and its configuration, which must match
node 0's except for where files are. Frames are length-prefixed; everything a node sends is JSON,
so node 0 never unpickles bytes from the network. The commands node 0 sends contain pickles (the
sampling parameters of new requests, see shm_ring): a worker node trusts the node 0 it connected
to, which is the trust torch.distributed asks for anyway. Run multi-node on a trusted network.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import struct
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, is_dataclass
from multiprocessing.connection import wait

from albireo.config import EngineConfig
from albireo.distributed.parallel_state import Rendezvous
from albireo.executor.worker import SHUTDOWN
from albireo.executor.worker_group import WorkerGroup

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
# How long node 0 waits for the other nodes to join, and they for node 0 to listen (torchrun's
# default join timeout).
JOIN_TIMEOUT_S = 600.0
_HELLO_TIMEOUT_S = 30.0
_FRAME_HEADER = struct.Struct("!Q")
_MAX_FRAME = 1 << 30  # far above any step plan; a larger length means the peer is not a relay
# Settings that may differ between nodes: where the files are, and which node this is.
_NODE_LOCAL = {
    "model.model",
    "model.tokenizer",
    "model.skip_tokenizer_init",
    "parallel.node_rank",
    "parallel.master_addr",
}


class NodeStopped(RuntimeError):
    """A worker node's relay stopped before node 0 said shutdown: why, in its message."""


# ---- messages -------------------------------------------------------------------------------------


@dataclass
class NodeHello:
    """A worker node's first frame."""

    protocol: int
    node_rank: int
    byteorder: str  # step plans are encoded in native byte order
    config: dict


@dataclass
class NodeWelcome:
    """Node 0's answer to a hello: None, or why the node is refused."""

    error: str | None


@dataclass
class NodeReply:
    """A worker's reply ("ok", value) or failure ("error", traceback; "died", exit code)."""

    rank: int
    status: str
    value: int | str | None


def _encode(message: NodeHello | NodeWelcome | NodeReply) -> bytes:
    return json.dumps(asdict(message), default=str).encode()


def _decode(cls: type, frame: bytes):
    try:
        return cls(**json.loads(frame))
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a {cls.__name__}: {e}") from None


def _config_summary(config: EngineConfig) -> dict:
    """The settings every node must share, flat ("section.field"), as they look after JSON."""
    flat = {}
    for name, value in asdict(config).items():
        if is_dataclass(getattr(config, name)):
            flat.update({f"{name}.{key}": v for key, v in value.items()})
        else:
            flat[name] = value
    return json.loads(json.dumps({k: v for k, v in flat.items() if k not in _NODE_LOCAL}, default=str))


# ---- the wire -------------------------------------------------------------------------------------


class Link:
    """One TCP connection carrying whole frames, in order, both ways."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(None)
        # A step's plan must leave at once, not wait for Nagle's algorithm to fill a packet.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A peer whose machine vanished never closes the connection: keepalive probes notice it
        # within about half a minute of silence.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
        self.sock = sock
        self._buf = bytearray()
        self._frames: deque[bytes] = deque()

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, frame: bytes) -> None:
        self.sock.sendall(_FRAME_HEADER.pack(len(frame)) + frame)

    def receive(self, timeout: float | None) -> bytes | None:
        """The next frame, or None if none is complete within `timeout` s; EOFError once the peer closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._frames:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.sock], [], [], left)[0]:
                return None
            self._read()
        return self._frames.popleft()

    def _read(self) -> None:
        data = self.sock.recv(1 << 18)
        if not data:
            raise EOFError("the peer closed the connection")
        buf = self._buf
        buf += data
        while len(buf) >= _FRAME_HEADER.size:
            (n,) = _FRAME_HEADER.unpack_from(buf)
            if n > _MAX_FRAME:
                raise ConnectionError(f"a frame of {n} bytes: the peer is not an Albireo node relay")
            end = _FRAME_HEADER.size + n
            if len(buf) < end:
                break
            self._frames.append(bytes(buf[_FRAME_HEADER.size : end]))
            del buf[:end]

    def close(self) -> None:
        self.sock.close()


def _listen(port: int) -> socket.socket:
    """A server socket on every interface, as torch's store listens: MASTER_ADDR may be any name of node 0."""
    try:
        if socket.has_dualstack_ipv6():
            return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        return socket.create_server(("", port))
    except OSError as e:
        raise ValueError(f"the node relay cannot listen on port {port} (master_port + 1): {e}") from None


# ---- node 0 ---------------------------------------------------------------------------------------


class RemoteNodes:
    """Node 0's end: a link to each other node, its workers' replies, and what went wrong there.

    The constructor returns once every other node has joined (before node 0 starts any worker, so
    a node with other settings fails the start at once); ValueError if one does not match.
    """

    def __init__(self, config: EngineConfig) -> None:
        par = config.parallel
        self.per_node = par.ranks_per_node
        self._links: dict[int, Link] = {}  # node rank -> link, while connected
        remote_ranks = range(self.per_node, par.tensor_parallel_size)
        self._replies: dict[int, deque[NodeReply]] = {rank: deque() for rank in remote_ranks}
        self._failures: list[tuple[str, bool]] = []  # (what happened, whether a process is gone)
        self._reported: set[int] = set()  # nodes that said what failed before they disconnected
        self._closed = False
        with _listen(par.master_port + 1) as server:
            try:
                self._accept(server, par.nnodes, par.master_port + 1, _config_summary(config))
            except BaseException:
                self.close()
                raise

    def _accept(self, server: socket.socket, nnodes: int, port: int, expected: dict) -> None:
        missing = set(range(1, nnodes))
        logger.info("waiting for node(s) %s to join on port %d", sorted(missing), port)
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while missing:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                server.settimeout(left)
                sock, (host, *_) = server.accept()
            except TimeoutError:
                raise TimeoutError(
                    f"node(s) {sorted(missing)} did not join within {JOIN_TIMEOUT_S:.0f} s: start each with "
                    "`albireo worker-node --node-rank K` and the same engine arguments"
                ) from None
            link = Link(sock)
            try:
                hello = _decode(NodeHello, link.receive(_HELLO_TIMEOUT_S) or b"")
            except (ValueError, EOFError, OSError):
                link.close()  # not an Albireo node (a port scan, a health check): not our business
                continue
            problem = _refusal(hello, missing, expected)
            link.send(_encode(NodeWelcome(problem)))
            if problem is not None:
                link.close()
                raise ValueError(f"the node at {host} cannot join: {problem}")
            self._links[hello.node_rank] = link
            missing.discard(hello.node_rank)
            logger.info("node %d joined from %s", hello.node_rank, host)

    def _ranks(self, node: int) -> range:
        return range(node * self.per_node, (node + 1) * self.per_node)

    def send(self, message: bytes) -> None:
        """Relay a command to every node; a node that is gone is recorded as such."""
        for node, link in list(self._links.items()):
            try:
                link.send(message)
            except OSError:
                self._lost(node)

    def reply(self, rank: int, timeout: float) -> NodeReply | None:
        """The next reply of a remote rank, or None if none came within `timeout` s."""
        queue = self._replies[rank]
        if not queue:
            self._drain(rank // self.per_node, timeout)
        return queue.popleft() if queue else None

    def failure(self, crashed_only: bool = False) -> str | None:
        """What went wrong on another node, deaths first: a dead worker or node, else (unless
        `crashed_only`) a worker's error."""
        for node in list(self._links):
            self._drain(node, 0)
        for text, crashed in sorted(self._failures, key=lambda f: not f[1]):
            if crashed or not crashed_only:
                return text
        return None

    def _drain(self, node: int, timeout: float) -> None:
        """Take in what `node` sent within `timeout` s: replies are queued, failures recorded."""
        link = self._links.get(node)
        if link is None:
            return
        try:
            frame = link.receive(timeout)
            while frame is not None:
                self._take(node, _decode(NodeReply, frame))
                frame = link.receive(0)
        except (EOFError, OSError, ValueError):
            self._lost(node)

    def _take(self, node: int, reply: NodeReply) -> None:
        if reply.rank not in self._ranks(node) or reply.status not in ("ok", "error", "died"):
            raise ValueError(f"node {node} sent {reply}, which is not a reply of one of its ranks")
        if reply.status == "ok":
            self._replies[reply.rank].append(reply)
            return
        self._reported.add(node)
        if reply.status == "error":
            self._failures.append((f"worker rank {reply.rank} on node {node} failed:\n{reply.value}", False))
        else:
            self._failures.append(
                (WorkerGroup.death(reply.rank, reply.value, node), reply.value != 0)
            )

    def _lost(self, node: int) -> None:
        self._links.pop(node).close()
        if node not in self._reported:
            ranks = self._ranks(node)
            self._failures.append((
                (f"node {node} (worker ranks {ranks.start}-{ranks.stop - 1}) disconnected: its "
                 "`albireo worker-node` process is gone or the network failed"),
                True,
            ))

    def close(self) -> None:
        """Tell every node to shut down, then hang up."""
        if self._closed:
            return
        self._closed = True
        for node in list(self._links):
            self._drain(node, 0)  # unread bytes would turn the close into a reset that loses the shutdown
        for link in self._links.values():
            try:
                link.sock.settimeout(1.0)  # a stuck node must not hang the engine's shutdown
                link.send(SHUTDOWN)
            except OSError:
                pass
            link.close()
        self._links.clear()


def _refusal(hello: NodeHello, missing: set[int], expected: dict) -> str | None:
    """Why node 0 refuses a node, or None."""
    if hello.protocol != PROTOCOL_VERSION:
        return f"it speaks relay protocol {hello.protocol}, node 0 speaks {PROTOCOL_VERSION}: run one Albireo version"
    if hello.byteorder != sys.byteorder:
        return f"it is {hello.byteorder}-endian and node 0 is {sys.byteorder}-endian"
    if hello.node_rank not in missing:
        return f"node_rank {hello.node_rank} is not one of the nodes still expected, {sorted(missing)}"
    if not isinstance(hello.config, dict):
        return "its hello has no configuration"
    diff = [
        f"{key} is {hello.config.get(key)!r} there and {expected.get(key)!r} on node 0"
        for key in sorted(expected.keys() | hello.config.keys())
        if hello.config.get(key) != expected.get(key)
    ]
    if diff:
        return f"node {hello.node_rank}'s engine arguments differ from node 0's: " + "; ".join(diff)
    return None


# ---- the other nodes ------------------------------------------------------------------------------


def run_worker_node(config: EngineConfig) -> None:
    """A worker node (`albireo worker-node`): join node 0, start this node's workers, relay.

    Returns when node 0 says shutdown. Raises NodeStopped when node 0 disappears or a worker here
    dies (node 0 has been told), ValueError when node 0 refuses this node's settings.
    """
    par = config.parallel
    if par.nnodes == 1 or par.node_rank == 0:
        raise ValueError(
            f"a worker node has node_rank 1 .. nnodes-1 (got node_rank={par.node_rank}, nnodes={par.nnodes}); "
            "node 0 runs the engine itself (albireo serve/generate/chat --node-rank 0)"
        )
    link = _connect(par.master_addr, par.master_port + 1)
    try:
        link.send(_encode(NodeHello(PROTOCOL_VERSION, par.node_rank, sys.byteorder, _config_summary(config))))
        try:
            welcome = _decode(NodeWelcome, link.receive(JOIN_TIMEOUT_S) or b"")
        except (EOFError, OSError, ValueError) as e:
            raise NodeStopped(f"node 0 did not answer this node's hello: {e}") from None
        if welcome.error is not None:
            raise ValueError(f"node 0 refused this node: {welcome.error}")
        workers = WorkerGroup(config, par.node_rank, Rendezvous(par.master_addr, par.master_port))
        for rank, proc in workers.procs.items():
            logger.info("worker rank %d: pid %d", rank, proc.pid)
        try:
            _relay(link, workers)
        except (EOFError, OSError) as e:
            raise NodeStopped(f"lost node 0 ({e}): the engine stopped uncleanly or the network failed") from None
        finally:
            workers.shutdown()
        logger.info("node 0 said shutdown")
    finally:
        link.close()


def _connect(addr: str, port: int) -> Link:
    """Connect to node 0's relay, waiting for it to listen (the nodes may start in any order)."""
    logger.info("connecting to node 0 at %s:%d", addr, port)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while True:
        try:
            return Link(socket.create_connection((addr, port), timeout=5.0))
        except OSError as e:
            if time.monotonic() >= deadline:
                raise NodeStopped(
                    f"node 0's relay at {addr}:{port} did not answer within {JOIN_TIMEOUT_S:.0f} s: {e}"
                ) from None
            time.sleep(0.5)


def _relay(link: Link, workers: WorkerGroup) -> None:
    """Put node 0's commands on this node's ring and send back the workers' replies, until shutdown."""
    watched = [link, *workers.conns.values(), *(proc.sentinel for proc in workers.procs.values())]
    while True:
        _forward_replies(link, workers)
        while (message := link.receive(0)) is not None:
            if message == SHUTDOWN:
                return  # the caller's workers.shutdown() passes it on
            workers.put(message, on_wait=lambda: _forward_replies(link, workers))
        wait(watched)


def _forward_replies(link: Link, workers: WorkerGroup) -> None:
    """Send node 0 what the workers said; if one has died, say so and stop."""
    for rank, conn in workers.conns.items():
        while conn.poll():
            try:
                status, value = conn.recv()
            except EOFError:
                break  # its exit is reported below
            link.send(_encode(NodeReply(rank, status, value)))
    dead = workers.dead()
    if dead is not None:
        rank, code = dead
        link.send(_encode(NodeReply(rank, "died", code)))
        raise NodeStopped(f"{WorkerGroup.death(rank, code)}; node 0 has been told")
