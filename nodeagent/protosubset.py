"""Subsets of a protobuf schema, parsed and built by upb (protobuf's C runtime).

A few messages the agent reads and writes on hot or always-loaded paths are described
here by the fields the agent uses, with their schema's field numbers, types and oneofs,
and built into a private DescriptorPool (fields left out are unknown to upb, skipped in
C when parsing): the ADS envelope (xds/adsproto.py) and Istio's CA messages
(identity/caproto.py, a schema no package publishes). A schema maps a message name to its fields as (name, number, type, oneof):
type is a scalar, a message of the same schema or a google.protobuf one, "repeated T"
or "map<string, T>"; a oneof only where the original has one. Tests check each schema's
numbers and types against the original's descriptors (xds-protos' for Envoy's, Istio's
ca.proto for the CA's).
"""

from __future__ import annotations

from typing import Callable

from google.protobuf import (any_pb2, descriptor_pb2, descriptor_pool, duration_pb2, message_factory, struct_pb2,
                             wrappers_pb2)

Schema = dict[str, list[tuple[str, int, str, "str | None"]]]
_F = descriptor_pb2.FieldDescriptorProto
SCALARS = {"string": _F.TYPE_STRING, "bool": _F.TYPE_BOOL, "int32": _F.TYPE_INT32, "uint32": _F.TYPE_UINT32,
           "int64": _F.TYPE_INT64, "uint64": _F.TYPE_UINT64}
_WELL_KNOWN = (any_pb2, duration_pb2, struct_pb2, wrappers_pb2)


def classes(file_name: str, package: str, schema: Schema) -> Callable[[str], type]:
    """The message classes of `schema` in a pool of their own: a function from a message
    name (of the schema, or google.protobuf.X) to its class."""
    pool = descriptor_pool.DescriptorPool()
    for module in _WELL_KNOWN:
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    pool.Add(schema_file(file_name, package, schema))

    def get(name: str) -> type:
        full = name if name.startswith("google.protobuf.") else f"{package}.{name}"
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(full))
    return get


def schema_file(file_name: str, package: str, schema: Schema) -> descriptor_pb2.FileDescriptorProto:
    """`schema` as a proto3 file of `package`."""
    file = descriptor_pb2.FileDescriptorProto(
        name=file_name, package=package, syntax="proto3", dependency=[m.DESCRIPTOR.name for m in _WELL_KNOWN])
    for name, fields in schema.items():
        message = file.message_type.add(name=name)
        oneofs = list(dict.fromkeys(oneof for *_, oneof in fields if oneof))
        for oneof in oneofs:
            message.oneof_decl.add(name=oneof)
        for field, number, kind, oneof in fields:
            proto = message.field.add(name=field, number=number, label=_F.LABEL_OPTIONAL)
            if oneof:
                proto.oneof_index = oneofs.index(oneof)
            if kind.startswith("map<string, "):
                proto.label = _F.LABEL_REPEATED
                entry = message.nested_type.add(name=_camel(field) + "Entry")
                entry.options.map_entry = True
                entry.field.add(name="key", number=1, label=_F.LABEL_OPTIONAL, type=_F.TYPE_STRING)
                _set_type(entry.field.add(name="value", number=2, label=_F.LABEL_OPTIONAL), kind[12:-1], package)
                proto.type, proto.type_name = _F.TYPE_MESSAGE, f".{package}.{name}.{entry.name}"
                continue
            if kind.startswith("repeated "):
                proto.label, kind = _F.LABEL_REPEATED, kind[9:]
            _set_type(proto, kind, package)
    return file


def _set_type(field: descriptor_pb2.FieldDescriptorProto, kind: str, package: str) -> None:
    if kind in SCALARS:
        field.type = SCALARS[kind]
    else:
        field.type = _F.TYPE_MESSAGE
        field.type_name = f".{kind}" if kind.startswith("google.protobuf.") else f".{package}.{kind}"


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))
