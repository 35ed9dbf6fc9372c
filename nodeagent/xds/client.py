"""A Python ADS client that subscribes as Envoy does, for `proxy-config` and tests.

`AdsSession` holds one stream open: it asks for clusters (wildcard), then for the
endpoints of the EDS clusters it got, then listeners (wildcard), then the route tables
those listeners name, and answers every response with an ACK, or with a NACK when the
`reject` callback returns a reason, exactly as a proxy would. It records every
response; `wait(predicate)` waits for the state a test expects. `fetch(...)` is the
one-shot form: connect, wait until every subscribed type has arrived, disconnect.

With a `deadline` (fetch always gives one) nothing waits past it: the channel must be
connected by then (a missing unix socket fails at once), the stream itself carries the
deadline as its gRPC timeout, and closing cancels the stream before the channel, so no
thread of gRPC's is left waiting on it. Errors are XdsClientErrors of one line, never a
gRPC object.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Callable

import grpc
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from google.protobuf.message import Message
from google.rpc.status_pb2 import Status

from nodeagent.errors import NodeagentError
from nodeagent.xds import resources as rt
from nodeagent.xds.server import METHOD, SERVICE
from nodeagent.xds.snapshot import eds_name, listener_routes
from nodeagent.xds.translate import build as _registers_extension_types  # noqa: F401 (Any unpacking)

INVALID_ARGUMENT = 3
Reject = Callable[[DiscoveryResponse], "str | None"]


class XdsClientError(NodeagentError):
    """The xDS server could not be reached or did not send what was asked in time."""


def target(address: str) -> str:
    """A grpc target for a unix socket path or a host:port."""
    return f"unix:{address}" if address.startswith("/") or address.startswith(".") else address


def describe(exc: BaseException) -> str:
    """One line for a gRPC error: its code and details, not the call object's repr."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        code = exc.code()
        return f"{code.name if code else 'UNKNOWN'}: {exc.details() or 'no details'}"
    return str(exc)


class AdsSession:
    def __init__(self, address: str, node: str, cluster: str = "nodeagent-client", reject: Reject | None = None,
                 deadline: float | None = None):
        """`deadline` (time.monotonic()): connecting and the whole stream end by then."""
        self.address, self.deadline = address, deadline
        self.node = Node(id=node, cluster=cluster)
        self.reject = reject
        self.resources: dict[str, dict[str, Message]] = {}
        self.responses: list[DiscoveryResponse] = []
        self.nacked: list[DiscoveryResponse] = []
        self.error: Exception | None = None
        self._names: dict[str, list[str]] = {}
        self._acked: dict[str, str] = {}
        self._nonce: dict[str, str] = {}
        self._requests: queue.Queue = queue.Queue()
        self._cond = threading.Condition()
        self._stream = None  # the call, once started: cancelled on close
        self._channel = grpc.insecure_channel(target(address))
        self._call = self._channel.stream_stream(f"/{SERVICE}/{METHOD}",
                                                 request_serializer=DiscoveryRequest.SerializeToString,
                                                 response_deserializer=DiscoveryResponse.FromString)
        self._thread = threading.Thread(target=self._receive, name="ads-client", daemon=True)

    def __enter__(self) -> "AdsSession":
        try:
            self._connect()
        except BaseException:
            self._channel.close()
            raise
        self._subscribe(rt.CLUSTER, [])
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _connect(self) -> None:
        """Fail now, not at the deadline, when there is nothing to connect to; with a
        deadline, wait for the channel only until then."""
        if target(self.address).startswith("unix:") and not os.path.exists(self.address):
            raise XdsClientError(f"no xDS server at {self.address}: the socket does not exist",
                                 "is the agent running with its waypoint on this node? (--xds-socket, or "
                                 "--lab with --node)")
        if self.deadline is None:
            return
        ready = grpc.channel_ready_future(self._channel)
        try:
            ready.result(timeout=max(0.0, self.deadline - time.monotonic()))
        except grpc.FutureTimeoutError:
            raise XdsClientError(f"cannot connect to the xDS server at {self.address} within the timeout",
                                 "is the agent running, and is this its socket?") from None
        finally:
            ready.cancel()

    def close(self) -> None:
        stream = self._stream
        if stream is not None:
            stream.cancel()  # ends the stream before the channel goes: nothing waits on it
        self._requests.put(None)
        self._channel.close()
        self._thread.join(5)

    def wait(self, predicate: Callable[["AdsSession"], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                if self.error is not None:
                    raise XdsClientError(f"the xDS stream from {self.address} failed: {describe(self.error)}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise XdsClientError(f"xDS server did not send the expected resources within {timeout:g}s",
                                         "is the agent running, and is this the node it serves?")
                self._cond.wait(left)

    def complete(self) -> bool:
        """Every type arrived, and every subscribed name of EDS and RDS is answered."""
        if rt.CLUSTER not in self.resources or rt.LISTENER not in self.resources:
            return False
        return all(set(self._names.get(t, [])) <= set(self.resources.get(t, {})) for t in rt.NAMED)

    # --- the stream ------------------------------------------------------------------
    def _outgoing(self):
        while True:
            request = self._requests.get()
            if request is None:
                return
            yield request

    def _receive(self) -> None:
        try:
            timeout = None if self.deadline is None else max(0.001, self.deadline - time.monotonic())
            self._stream = self._call(self._outgoing(), timeout=timeout)
            for response in self._stream:
                self._handle(response)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = exc
        except ValueError as exc:  # the channel closed under us
            self.error = exc
        with self._cond:
            self._cond.notify_all()

    def _subscribe(self, type_url: str, names: list[str]) -> None:
        self._names[type_url] = names
        self._requests.put(DiscoveryRequest(
            node=self.node, type_url=type_url, resource_names=names,
            version_info=self._acked.get(type_url, ""), response_nonce=self._nonce.get(type_url, "")))

    def _handle(self, response: DiscoveryResponse) -> None:
        type_url = response.type_url
        reason = self.reject(response) if self.reject else None
        with self._cond:
            self.responses.append(response)
            self._nonce[type_url] = response.nonce
            if reason:
                self.nacked.append(response)
            else:
                self._acked[type_url] = response.version_info
                self.resources[type_url] = {rt.name_of(m): m for m in (rt.unpack(a) for a in response.resources)}
            self._requests.put(DiscoveryRequest(
                node=self.node, type_url=type_url, resource_names=self._names.get(type_url, []),
                version_info=self._acked.get(type_url, ""), response_nonce=response.nonce,
                error_detail=Status(code=INVALID_ARGUMENT, message=reason) if reason else None))
            if not reason:
                self._follow(type_url)
            self._cond.notify_all()

    def _follow(self, type_url: str) -> None:
        """Subscribe to what the resources just received refer to, as Envoy does."""
        if type_url == rt.CLUSTER:
            names = sorted(eds_name(c) for c in self.resources[rt.CLUSTER].values()
                           if c.type == Cluster.DiscoveryType.EDS)
            if names != self._names.get(rt.ENDPOINT):
                self._subscribe(rt.ENDPOINT, names)
            if not names and rt.LISTENER not in self._names:
                self._subscribe(rt.LISTENER, [])
        elif type_url == rt.ENDPOINT and rt.LISTENER not in self._names:
            self._subscribe(rt.LISTENER, [])
        elif type_url == rt.LISTENER:
            names = sorted({name for listener in self.resources[rt.LISTENER].values()
                            for name in listener_routes(listener)})
            if names != self._names.get(rt.ROUTE):
                self._subscribe(rt.ROUTE, names)


def fetch(address: str, node: str, timeout: float = 10.0,
          deadline: float | None = None) -> dict[str, dict[str, Message]]:
    """Everything the server has for node id `node`, by type URL then name; all of it,
    connecting included, within `timeout` seconds, or by `deadline` (time.monotonic())
    when the caller's budget started earlier (XdsClientError otherwise)."""
    deadline = deadline if deadline is not None else time.monotonic() + timeout
    with AdsSession(address, node, cluster="nodeagent-proxy-config", deadline=deadline) as session:
        try:
            session.wait(AdsSession.complete, max(0.0, deadline - time.monotonic()))
        except XdsClientError as err:
            if session.error is None and not session.responses:
                raise XdsClientError(f"the xDS server at {address} sent nothing for node id {node!r} within "
                                     f"{timeout:g}s", "it answers only for the node its agent serves: give that "
                                     "node's name with --node") from None
            raise err
        return {t: dict(session.resources.get(t, {})) for t in rt.PUSH_ORDER}
