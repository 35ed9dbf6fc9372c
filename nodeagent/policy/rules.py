"""AuthorizationPolicy rules (`from`, `to`, `when`) → the Conditions authz.py evaluates.

Every Source and Operation field and every `when` key maps to one Istio attribute and a
kind of value (string pattern, CIDR, port, service account). Fields and keys only HTTP
can supply (requestPrincipals, hosts, methods, paths, request.*, remoteIpBlocks and
remote.ip, the original client behind a proxy, and connection.sni, which L4 does not
see either) compile to nothing and are listed in `Rule.l7_fields`, so
authz.py can fail safe. Values are checked as Istio's webhook checks them; a bad one
raises ConfigError naming its path, e.g. `spec.rules[0].from[1].source.ipBlocks[0]`.
"""

from __future__ import annotations

import ipaddress
import re

from nodeagent.addresses import unmapped
from nodeagent.policy.authz import Condition, Net, Port, Rule, Text
from nodeagent.policy.schema import Field, attempt

CONDITIONS_DOC = "https://istio.io/latest/docs/reference/config/security/conditions/"
NUMBER = re.compile(r"^[0-9]+\Z")

# Source field -> (attribute, negated, value kind); kind None: HTTP only.
SOURCE_FIELDS = {
    "principals": ("source.principal", False, "text"),
    "notPrincipals": ("source.principal", True, "text"),
    "requestPrincipals": ("request.auth.principal", False, None),
    "notRequestPrincipals": ("request.auth.principal", True, None),
    "namespaces": ("source.namespace", False, "text"),
    "notNamespaces": ("source.namespace", True, "text"),
    "serviceAccounts": ("source.serviceAccount", False, "sa"),
    "notServiceAccounts": ("source.serviceAccount", True, "sa"),
    "ipBlocks": ("source.ip", False, "net"),
    "notIpBlocks": ("source.ip", True, "net"),
    "remoteIpBlocks": ("remote.ip", False, "net"),
    "notRemoteIpBlocks": ("remote.ip", True, "net"),
}
OPERATION_FIELDS = {
    "hosts": ("request.host", False, None),
    "notHosts": ("request.host", True, None),
    "ports": ("destination.port", False, "port"),
    "notPorts": ("destination.port", True, "port"),
    "methods": ("request.method", False, None),
    "notMethods": ("request.method", True, None),
    "paths": ("request.path", False, None),
    "notPaths": ("request.path", True, None),
}
# Attributes whose values are checked here but which only HTTP can supply: remote.ip is
# the original client (X-Forwarded-For, PROXY protocol), which L4 sees only as the peer it
# came through (behind a gateway, the gateway's pod). As ztunnel reads them: an ALLOW rule
# naming one matches nothing, a DENY one is enforced without it (so it denies more).
HTTP_ONLY = frozenset({"remote.ip"})
# `when` keys L4 evaluates (but HTTP_ONLY's), with their value kind.
L4_KEYS = {"source.ip": "net", "remote.ip": "net", "source.namespace": "text",
           "source.principal": "text", "source.serviceAccount": "sa",
           "destination.ip": "net", "destination.port": "port"}
L7_KEYS = ("request.auth.principal", "request.auth.audiences", "request.auth.presenter",
           "connection.sni")
L7_KEY_FAMILIES = ("request.headers[", "request.auth.claims[")
L7_KEY_NAMES = {"request.headers[": re.compile(r"\[[^\[\]]+\]"),
                "request.auth.claims[": re.compile(r"(\[[^\[\]]+\])+")}
IDENTITY_FIELDS = ("principals", "notPrincipals", "namespaces", "notNamespaces")


def rule(field: Field, namespace: str) -> Rule:
    """One entry of `spec.rules`; `namespace` is the policy's (for bare service accounts)."""
    if field.value is None:
        raise field.error("a rule must not be null", "write {} for a rule that matches everything")
    parts = field.fields(("from", "to", "when"))
    l7: list[str] = []
    sources = attempt(lambda: _entries(parts["from"], "source", SOURCE_FIELDS, namespace, l7), ())
    operations = attempt(lambda: _entries(parts["to"], "operation", OPERATION_FIELDS, namespace, l7), ())
    conditions = tuple(c for found in parts["when"].each(lambda w: _condition(w, namespace, l7)) for c in found)
    return Rule(sources, operations, conditions, tuple(dict.fromkeys(l7)))


def _entries(field: Field, inner: str, table: dict, namespace: str,
             l7: list[str]) -> tuple[tuple[Condition, ...], ...]:
    items = field.items()
    if field.present and not items:
        raise field.error("must not be an empty list", f"remove it to match any {inner}")
    return tuple(field.each(lambda item: _entry(item, inner, table, namespace, l7)))


def _entry(item: Field, inner: str, table: dict, namespace: str, l7: list[str]) -> tuple[Condition, ...]:
    body = item.fields((inner,))[inner]
    conditions, http = _conjunction(body, table, namespace)
    given = [k for k, v in (body.value or {}).items() if v]  # (fields() refused a value that is no map)
    if not given:  # (a field that is set but wrong, or unknown, is its own error)
        raise body.error(f"{inner} must set at least one field", f"known fields: {', '.join(table)}")
    l7.extend(http)
    return conditions


def _conjunction(body: Field, table: dict, namespace: str) -> tuple[tuple[Condition, ...], list[str]]:
    fields = body.fields(tuple(table))
    if "serviceAccounts" in fields and _identity_mixed(fields):
        raise body.error("serviceAccounts/notServiceAccounts cannot be combined with principals or namespaces",
                         "use one way of naming the source identity per source")
    conditions, http = [], []
    for name, field in fields.items():
        attribute, negate, kind = table[name]
        if kind is None:
            if attempt(field.strings, ()):
                http.append(name)
            continue
        patterns = attempt(lambda: _patterns(field, kind, namespace), ())
        if patterns and attribute in HTTP_ONLY:
            http.append(name)
        elif patterns:
            conditions.append(Condition(attribute, patterns, negate))
    return tuple(conditions), http


def _identity_mixed(fields: dict[str, Field]) -> bool:
    accounts = fields["serviceAccounts"].present or fields["notServiceAccounts"].present
    return accounts and any(fields[n].present for n in IDENTITY_FIELDS)


def _condition(field: Field, namespace: str, l7: list[str]) -> list[Condition]:
    parts = field.fields(("key", "values", "notValues"))
    key = parts["key"].string()
    if not key:
        raise parts["key"].error("must be set", f"see {CONDITIONS_DOC}")
    kind = _key_kind(key, parts["key"])
    if not parts["values"].items() and not parts["notValues"].items():
        raise field.error(f"condition {key} needs values or notValues")
    if kind is None:
        parts["values"].strings()
        parts["notValues"].strings()
        l7.append(key)
        return []
    out = []
    for name, negate in (("values", False), ("notValues", True)):
        patterns = _patterns(parts[name], kind, namespace)
        if patterns:
            out.append(Condition(key, patterns, negate))
    if key in HTTP_ONLY:
        l7.append(key)
        return []
    return out


def _key_kind(key: str, field: Field) -> str | None:
    """The value kind of an L4 key, None for a known key L4 cannot see; refuses others."""
    if key in L4_KEYS:
        return L4_KEYS[key]
    if key in L7_KEYS or key.startswith("experimental.envoy.filters."):
        return None
    for family in L7_KEY_FAMILIES:
        if key.startswith(family) or key == family[:-1]:
            # request.headers[name]; request.auth.claims[a][b] (nested claims). Brackets inside
            # a name are refused: istiod's parser and ours would read different claims.
            if not L7_KEY_NAMES[family].fullmatch(key[len(family) - 1:]):
                raise field.error(f"{key!r} must name what it reads in brackets, without brackets in a name",
                                  f"for example {family}x-user]")
            return None
    raise field.error(f"unknown condition key {key!r}", f"see {CONDITIONS_DOC}")


def _patterns(field: Field, kind: str, namespace: str) -> tuple:
    parse = _PARSERS[kind]
    found = [attempt(lambda item=item, text=text: (parse(item, text, namespace),)) for item, text in field.string_items()]
    return tuple(one[0] for one in found if one is not None)


def _text(field: Field, text: str, namespace: str) -> Text:
    return Text(text)


def _net(field: Field, text: str, namespace: str) -> Net:
    address, _, bits = text.partition("/")
    try:
        if bits and not NUMBER.match(bits):
            raise ValueError(text)
        net = ipaddress.ip_network(text, strict=False)
        mapped = unmapped(net.network_address)
        if mapped.version != net.version and net.prefixlen >= 96:  # ::ffff:a.b.c.d/n: the IPv4 block,
            net = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}", strict=False)  # as sources are read
        return Net(net)
    except ValueError:
        raise field.error(f"{text!r} is not an IP address or CIDR",
                          'write an address ("10.1.2.3") or a CIDR ("10.1.0.0/16")') from None


def _port(field: Field, text: str, namespace: str) -> Port:
    if not NUMBER.match(text) or int(text) > 65535:
        raise field.error(f"{text!r} is not a port number 0-65535",
                          "ports are the destination pod's port numbers, as strings")
    return Port(int(text))


def _service_account(field: Field, text: str, namespace: str) -> Text:
    """`ns/sa`, or `sa` in the policy's namespace; exact, as Istio allows no wildcard."""
    parts = text.split("/")
    if "*" in text or len(parts) > 2 or not all(parts) or len(text) > 320:
        raise field.error(f"{text!r} is not a service account",
                          "write <namespace>/<name>, or <name> for the policy's namespace; no wildcards")
    return Text(text if len(parts) == 2 else f"{namespace}/{text}")


_PARSERS = {"text": _text, "net": _net, "port": _port, "sa": _service_account}
