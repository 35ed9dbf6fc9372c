"""The data path's engines for the relay tests, which every engine must pass (STYLE 14:
the Python and C paths share their tests): `python` (asyncio, agent/proxy/splice.py),
`native` (the C engine of native/, splice(2)) and `native-copy` (the same engine told
never to splice: its read/write fallback). A test takes the `engine` fixture of its
module (`engine_fixture`) and opens `splicer(engine)` inside its loop. The agent's relay
tests also take `native-hbone`: the native relay engine and the native HBONE engine
(native/hbone.c, setting hbone_engine) carrying every HBONE hop; `hbone_engine(engine)`
says which HBONE engine an engine name means.

Without the built native module a native case is skipped on a developer machine and
*fails* under CI (tests/conftest.py's CI rule), so a missing build cannot pass unseen.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import pathlib
import socket
from contextlib import asynccontextmanager

import pytest

from nodeagent import native
from nodeagent.agent.proxy.splice import Splicer

ENGINES = ("python", "native", "native-copy")
NATIVE_HBONE = "native-hbone"
LOG = logging.getLogger("test.engines")


def ci_enabled() -> bool:
    spec = importlib.util.spec_from_file_location("tiers_conftest", pathlib.Path(__file__).parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ci_enabled()


def require_native() -> None:
    """The native module is built and current; else skip (fail under CI)."""
    try:
        native.load()
    except native.NativeUnavailable as exc:
        if ci_enabled():
            pytest.fail(f"CI: the native engine must be tested: {exc}", pytrace=False)
        pytest.skip(str(exc))


def require_native_hbone() -> None:
    """The native HBONE module is built and current; else skip (fail under CI)."""
    from nodeagent.native import hbone

    try:
        hbone.load()
    except native.NativeUnavailable as exc:
        if ci_enabled():
            pytest.fail(f"CI: the native HBONE engine must be tested: {exc}", pytrace=False)
        pytest.skip(str(exc))


def hbone_engine(engine: str) -> str:
    """The hbone_engine setting an engine name of these tests means."""
    return "native" if engine == NATIVE_HBONE else "python"


def engine_fixture(engines=ENGINES):
    """A module's `engine` fixture: each test runs once per engine."""
    @pytest.fixture(params=engines)
    def engine(request) -> str:
        if request.param != "python":
            require_native()
        if request.param == NATIVE_HBONE:
            require_native_hbone()
        return request.param
    return engine


@asynccontextmanager
async def splicer(engine: str, **options):
    """A started Splicer of `engine`, closed after. For a native engine, that it took
    every socket pair the test relayed is checked by the test (`native_relays`)."""
    if engine == "native-copy":
        options["copy_only"] = True
    s = Splicer("python" if engine == "python" else "native", LOG, **options)
    await s.start()
    try:
        yield s
    finally:
        s.close()


def native_relays(s: Splicer) -> int:
    """How many relays the splicer's native engine took (0 for the Python path)."""
    return s.engine.stats()["relays_total"] if s.engine is not None else 0


async def tcp_pair(rcvbuf: int = 0) -> tuple[socket.socket, socket.socket]:
    """(our end, relay end) of one loopback TCP connection; `rcvbuf` bounds our end's
    receive buffer (set before connecting, so the window is small from the start)."""
    loop = asyncio.get_running_loop()
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        lst.setblocking(False)
        ours = socket.socket()
        if rcvbuf:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        ours.setblocking(False)
        await loop.sock_connect(ours, lst.getsockname())
        theirs, _ = await loop.sock_accept(lst)
    return ours, theirs


async def unix_pair(rcvbuf: int = 0) -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    if rcvbuf:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    ours.setblocking(False)
    theirs.setblocking(False)
    return ours, theirs


async def read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    chunks = []
    while chunk := await loop.sock_recv(sock, 65536):
        chunks.append(chunk)
    return b"".join(chunks)
