"""Test helper: a subset schema (nodeagent/protosubset.py) checked against the original's
descriptors, field by field."""

from __future__ import annotations


def same_fields(ours, envoy) -> None:
    """Every field of the subset message `ours` (a descriptor) is the field of that name of
    Envoy's `envoy` (xds-protos' descriptor): same number, type, repetition, presence and
    oneof, of the message of the same name (any message for a Skipped one); a map entry's
    key and value likewise."""
    for field in ours.fields:
        theirs = envoy.fields_by_name.get(field.name)
        assert theirs is not None, f"{envoy.full_name} has no field {field.name}"
        skipped = field.message_type is not None and field.message_type.name == "Skipped"
        found = [(f.number, f.type, f.is_repeated, f.has_presence, f.containing_oneof and f.containing_oneof.name,
                  None if skipped or f.message_type is None else f.message_type.name) for f in (field, theirs)]
        assert (field.full_name, found[0]) == (field.full_name, found[1])
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            same_fields(field.message_type, theirs.message_type)
