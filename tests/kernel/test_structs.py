"""The Python mirrors (nodeagent/capture/structs.py) match bpf/nodeagent.h.

Layouts come from clang itself: bcc describes every map's key and value type with
clang's offsets (inserting `__pad_*` fields where the compiler padded). Map types,
sizes and max_entries come from the kernel (the probe's maps are pinned, then read
back). Codes and counters are read from the header text.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
from pathlib import Path

import pytest

from nodeagent.capture import bpfsys
from nodeagent.capture.loader import DEFAULT_BPF_DIR
from nodeagent.capture.programs import cflags
from nodeagent.capture.structs import (COUNTERS_MAX, MAPS, MAX_EXCLUDED_PORTS, POD_F_CAPTURE, Code,
                                       Counter)

PROBE = Path(__file__).with_name("layout_probe.c")
HEADER = (DEFAULT_BPF_DIR / "nodeagent.h").read_text()
PORTS = {"outbound": 15001, "inbound": 15006, "tunnel": 15008, "admin": 15020}


@pytest.fixture(scope="module")
def probe():
    """The header compiled alone; its maps pinned in a throwaway dir. bcc is imported
    here, past the root check: where the tier runs, a missing bcc is an error, not a skip."""
    import bcc
    from kernel_sandbox import throwaway_pin_dir
    with throwaway_pin_dir() as pin_dir:
        maps_dir = os.path.join(pin_dir, "maps")
        os.makedirs(maps_dir)
        module = bcc.BPF(src_file=str(PROBE).encode(),
                         cflags=cflags(str(DEFAULT_BPF_DIR), maps_dir, 0x539, PORTS))
        try:
            yield module, maps_dir
        finally:
            module.cleanup()


def layout(ctype) -> dict[str, tuple[int, int]]:
    """field path -> (offset, size), nested structs flattened; {} for a scalar."""
    out = {}
    for name, ftype, *_ in getattr(ctype, "_fields_", []):
        field = getattr(ctype, name)
        out[name] = (field.offset, field.size)
        for sub, (offset, size) in layout(ftype).items():
            out[f"{name}.{sub}"] = (field.offset + offset, size)
    return out


def clang_type(module, name: str, which: str):
    import bcc
    describe = bcc.lib.bpf_table_key_desc if which == "key" else bcc.lib.bpf_table_leaf_desc
    return bcc.BPF._decode_table_type(json.loads(describe(module.module, name.encode())))


@pytest.mark.parametrize("spec", MAPS, ids=[m.name for m in MAPS])
def test_key_and_value_layout_match_clang(probe, spec):
    module, _ = probe
    for which, mirror in (("key", spec.key), ("value", spec.value)):
        compiled = clang_type(module, spec.name, which)
        assert ctypes.sizeof(mirror) == ctypes.sizeof(compiled), (spec.name, which)
        assert layout(mirror) == layout(compiled), (spec.name, which)
        assert not any("__pad" in f for f in layout(compiled)), "padding must be explicit"


@pytest.mark.parametrize("spec", MAPS, ids=[m.name for m in MAPS])
def test_map_definition_matches_kernel(probe, spec):
    _, maps_dir = probe
    fd = bpfsys.obj_get(os.path.join(maps_dir, spec.name))
    try:
        info = bpfsys.map_info(fd)
    finally:
        os.close(fd)
    assert (info.name.decode(), info.type, info.key_size, info.value_size, info.max_entries) == (
        spec.name, spec.type, ctypes.sizeof(spec.key), ctypes.sizeof(spec.value), spec.max_entries)


def test_every_pinned_map_is_mirrored(probe):
    _, maps_dir = probe
    assert sorted(os.listdir(maps_dir)) == sorted(m.name for m in MAPS)


def _enum(prefix: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(rf"\b({prefix}\w+) = (-?\d+),", HEADER)}


def test_codes_counters_and_constants_match_header():
    assert _enum("NA_CNT_") == {**{f"NA_CNT_{c.name}": c.value for c in Counter}, "NA_CNT_MAX": COUNTERS_MAX}
    codes = {k: v for k, v in _enum("NA_").items() if re.match(r"NA_(OK|SKIP_|ERR_)", k)}
    assert codes == {f"NA_{c.name}": c.value for c in Code}
    assert re.search(rf"#define NA_MAX_EXCLUDED_PORTS {MAX_EXCLUDED_PORTS}\b", HEADER)
    assert re.search(rf"#define NA_POD_F_CAPTURE \(1U << {POD_F_CAPTURE.bit_length() - 1}\)", HEADER)
