"""What a VirtualService HTTP route does, in Envoy terms, following istiod's route.go:
destinations (one cluster, or weighted clusters without the 0-weight ones), rewrite
(prefix, regex, authority), timeout (0 = none when unset), retries (Istio's default
policy when unset, none when attempts is 0), mirrors, header operations (set =
overwrite, add = append; `:authority`/`host` become a host rewrite), redirect, direct
response and the per-route fault filter config.
"""

from __future__ import annotations

from datetime import timedelta

from envoy.config.core.v3.base_pb2 import DataSource, HeaderValue, HeaderValueOption, RuntimeFractionalPercent
from envoy.config.route.v3.route_components_pb2 import (
    DirectResponseAction, RedirectAction, RetryPolicy, RouteAction, WeightedCluster)
from envoy.extensions.filters.common.fault.v3.fault_pb2 import FaultDelay
from envoy.extensions.filters.http.fault.v3.fault_pb2 import FaultAbort, HTTPFault
from envoy.extensions.retry.host.previous_hosts.v3.previous_hosts_pb2 import PreviousHostsPredicate
from envoy.type.matcher.v3.regex_pb2 import RegexMatchAndSubstitute, RegexMatcher
from envoy.type.v3.percent_pb2 import FractionalPercent

from nodeagent.xds.istio.fields import HeaderOps
from nodeagent.xds.istio.virtualservice import Fault, HttpRoute, Redirect, Retry, VirtualService
from nodeagent.xds.resources import pack
from nodeagent.xds.translate.context import Context
from nodeagent.xds.translate.primitives import boolean, fraction, u32

OVERWRITE = HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
APPEND = HeaderValueOption.HeaderAppendAction.APPEND_IF_EXISTS_OR_ADD
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
REDIRECT_CODES = {301: RedirectAction.RedirectResponseCode.MOVED_PERMANENTLY,
                  302: RedirectAction.RedirectResponseCode.FOUND,
                  303: RedirectAction.RedirectResponseCode.SEE_OTHER,
                  307: RedirectAction.RedirectResponseCode.TEMPORARY_REDIRECT,
                  308: RedirectAction.RedirectResponseCode.PERMANENT_REDIRECT}
HUNDRED_PERCENT = FractionalPercent(numerator=100, denominator=FractionalPercent.DenominatorType.HUNDRED)


def route_action(ctx: Context, vs: VirtualService, http: HttpRoute, port: int,
                 headers: "HeaderChanges") -> RouteAction:
    action = RouteAction(timeout=http.timeout or timedelta(0), retry_policy=retry_policy(http.retries))
    where = f"{vs.where} {http.path}"
    live = [(i, d) for i, d in enumerate(http.route) if d.weight or len(http.route) == 1]
    if len(live) == 1:
        i, only = live[0]
        action.cluster = ctx.destination(only.destination, vs.namespace, port, f"{where}.route[{i}].destination")
        headers.extend(only.headers)
    else:
        action.weighted_clusters.CopyFrom(WeightedCluster(clusters=[
            _weighted(ctx, vs, d, port, f"{where}.route[{i}]") for i, d in live]))
    _rewrite(action, http, headers.authority)
    action.request_mirror_policies.extend(
        RouteAction.RequestMirrorPolicy(cluster=ctx.destination(m.destination, vs.namespace, port,
                                                                f"{where}.mirror"),
                                        runtime_fraction=RuntimeFractionalPercent(
                                            default_value=fraction(m.fraction) if m.fraction else HUNDRED_PERCENT),
                                        trace_sampled=boolean(False))
        for m in http.mirrors if m.fraction is None or m.fraction.value > 0)
    return action


def _weighted(ctx: Context, vs: VirtualService, dest, port: int, where: str) -> WeightedCluster.ClusterWeight:
    out = WeightedCluster.ClusterWeight(name=ctx.destination(dest.destination, vs.namespace, port,
                                                             f"{where}.destination"), weight=u32(dest.weight))
    changes = HeaderChanges()
    changes.extend(dest.headers)
    changes.apply(out)
    if changes.authority:
        out.host_rewrite_literal = changes.authority
    return out


def _rewrite(action: RouteAction, http: HttpRoute, authority: str) -> None:
    rewrite = http.rewrite
    if rewrite is not None:
        if rewrite.regex:
            action.regex_rewrite.CopyFrom(RegexMatchAndSubstitute(pattern=RegexMatcher(regex=rewrite.regex[0]),
                                                                  substitution=rewrite.regex[1]))
        elif rewrite.uri:
            action.prefix_rewrite = rewrite.uri
        authority = rewrite.authority or authority
    if authority:
        action.host_rewrite_literal = authority


def retry_policy(retry: Retry | None) -> RetryPolicy | None:
    """istiod's ConvertPolicy: its default when unset; none when attempts is 0; else the
    default with attempts, retryOn (numbers become retriable status codes) and the rest."""
    if retry is None:
        return RetryPolicy(num_retries=u32(2), retry_on=DEFAULT_RETRY_ON, retriable_status_codes=[503],
                           host_selection_retry_max_attempts=5, retry_host_predicate=[_previous_hosts()])
    if retry.attempts <= 0:
        return None
    retry_on, codes = _retry_on(retry.retry_on) if retry.retry_on else (DEFAULT_RETRY_ON, [503])
    return RetryPolicy(
        num_retries=u32(retry.attempts), retry_on=retry_on, retriable_status_codes=codes,
        host_selection_retry_max_attempts=5, per_try_timeout=retry.per_try_timeout,
        retry_host_predicate=[] if retry.retry_ignore_previous_hosts is False else [_previous_hosts()],
        retry_back_off=None if retry.backoff is None else RetryPolicy.RetryBackOff(base_interval=retry.backoff))


def _retry_on(text: str) -> tuple[str, list[int]]:
    """Istio's retryOn as Envoy's retry_on and the HTTP status codes in it, which go to
    retriable_status_codes (and need the retriable-status-codes condition)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    codes = [int(p) for p in parts if p.isdigit() and 100 <= int(p) <= 599]
    retry_on = ",".join(p for p in parts if not (p.isdigit() and 100 <= int(p) <= 599))
    if codes and "retriable-status-codes" not in retry_on:
        retry_on = ",".join(filter(None, (retry_on, "retriable-status-codes")))
    return retry_on, codes


def _previous_hosts() -> RetryPolicy.RetryHostPredicate:
    return RetryPolicy.RetryHostPredicate(name="envoy.retry_host_predicates.previous_hosts",
                                          typed_config=pack(PreviousHostsPredicate()))


def fault_config(fault: Fault | None) -> dict:
    """typed_per_filter_config for envoy.filters.http.fault ({} without a fault)."""
    if fault is None:
        return {}
    delay = abort = None
    if fault.delay is not None:
        # istiod: an unset percentage is the deprecated integer percent, 0 when unset too.
        delay = FaultDelay(fixed_delay=fault.delay, percentage=fraction(fault.delay_fraction) if
                           fault.delay_fraction else FractionalPercent(
                               numerator=0, denominator=FractionalPercent.DenominatorType.HUNDRED))
    if fault.has_abort:
        abort = FaultAbort(http_status=fault.abort_http, grpc_status=fault.abort_grpc,
                           percentage=fraction(fault.abort_fraction) if fault.abort_fraction else None)
    return {"envoy.filters.http.fault": pack(HTTPFault(delay=delay, abort=abort))}


def redirect(value: Redirect, port: int) -> RedirectAction:
    out = RedirectAction(host_redirect=value.authority, path_redirect=value.uri or None,
                         response_code=REDIRECT_CODES[value.code])
    if value.scheme:
        out.scheme_redirect = value.scheme
    if value.port is not None or value.derive_port == "FROM_REQUEST_PORT":
        number = value.port if value.port is not None else port
        scheme = value.scheme or "http"
        if (number, scheme) not in ((80, "http"), (443, "https")):
            out.port_redirect = number
    return out


def direct_response(status: int, body: str | None) -> DirectResponseAction:
    return DirectResponseAction(status=status, body=DataSource(inline_string=body) if body is not None else None)


class HeaderChanges:
    """Header operations of a route and its destination, merged as istiod merges them."""

    def __init__(self) -> None:
        self.request_add: list[HeaderValueOption] = []
        self.request_remove: list[str] = []
        self.response_add: list[HeaderValueOption] = []
        self.response_remove: list[str] = []
        self.authority = ""

    def extend(self, ops: HeaderOps | None) -> None:
        if ops is None:
            return
        self.request_add += _options(ops.request_set, OVERWRITE) + _options(ops.request_add, APPEND)
        self.response_add += _options(ops.response_set, OVERWRITE) + _options(ops.response_add, APPEND)
        self.request_remove += [h for h in ops.request_remove if not _internal(h)]
        self.response_remove += [h for h in ops.response_remove if not _internal(h)]
        authority = [v for k, v in ops.request_set if k in (":authority", "host")]
        authority = authority or [v for k, v in ops.request_add if k in (":authority", "host")]
        self.authority = authority[-1] if authority else self.authority

    def apply(self, target) -> None:
        """Fill the four header fields of a Route or a WeightedCluster.ClusterWeight
        (empty until then: protobuf's repeated fields are extended, not assigned)."""
        target.request_headers_to_add.extend(self.request_add)
        target.request_headers_to_remove.extend(self.request_remove)
        target.response_headers_to_add.extend(self.response_add)
        target.response_headers_to_remove.extend(self.response_remove)


def _internal(name: str) -> bool:
    return name.startswith(":") or name == "host"


def _options(pairs, action) -> list[HeaderValueOption]:
    return [HeaderValueOption(header=HeaderValue(key=k, value=v), append_action=action)
            for k, v in pairs if not _internal(k)]
