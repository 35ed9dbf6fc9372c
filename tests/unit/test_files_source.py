"""sources/files.py: a watched directory of YAML turns into Models; changes, deletions,
broken files (last good objects stay), subdirectories and hidden files."""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import shutil
import time
from contextlib import contextmanager

import pytest

from nodeagent.errors import ConfigError
from nodeagent.sources.files import RACY_SECONDS, FilesSource


def pod(name: str, version: str = "v1", namespace: str = "shop") -> str:
    return (f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, "
            f"labels: {{version: {version}}}}}\nstatus: {{phase: Running, podIP: 10.0.0.2}}\n")


def names(model) -> set[str]:
    return {name for _, name in model.pods}


def age(path, seconds: float = RACY_SECONDS + 5) -> None:
    """Backdate a file so it is past the window in which content is compared."""
    past = time.time() - seconds
    os.utime(path, (past, past))


@pytest.fixture
def source(tmp_path):
    errors: list[ConfigError] = []
    src = FilesSource(tmp_path, log=logging.getLogger("test.files"), on_error=errors.append)
    src.reported = errors  # type: ignore[attr-defined]
    return src


def test_empty_or_missing_directory(tmp_path):
    assert FilesSource(tmp_path).poll() is None
    missing = FilesSource(tmp_path / "nope")
    assert missing.poll() is None
    assert dict(missing.model().pods) == {}


def test_new_file_gives_a_model_then_none_while_unchanged(tmp_path, source):
    (tmp_path / "a.yaml").write_text(pod("a"))
    model = source.poll()
    assert model is not None and names(model) == {"a"}
    assert source.poll() is None
    age(tmp_path / "a.yaml")
    assert source.poll() is None  # a new stamp with the same content is no change
    assert source.poll() is None


def test_second_file_adds_objects(tmp_path, source):
    (tmp_path / "a.yaml").write_text(pod("a"))
    source.poll()
    (tmp_path / "b.yml").write_text(pod("b"))
    assert names(source.poll()) == {"a", "b"}


def test_modified_file_same_size_within_a_timestamp_tick(tmp_path, source):
    path = tmp_path / "a.yaml"
    path.write_text(pod("a", "v1"))
    stamp = path.stat().st_mtime_ns
    assert source.poll().pods[("shop", "a")].labels["version"] == "v1"
    # Same size, same inode and (forced) the same mtime: only the content tells.
    path.write_text(pod("a", "v2"))
    os.utime(path, ns=(stamp, stamp))
    model = source.poll()
    assert model is not None and model.pods[("shop", "a")].labels["version"] == "v2"


def test_modified_old_file(tmp_path, source):
    path = tmp_path / "a.yaml"
    path.write_text(pod("a", "v1"))
    age(path, 100)
    source.poll()
    path.write_text(pod("a", "v22"))
    assert source.poll().pods[("shop", "a")].labels["version"] == "v22"


def test_replaced_by_rename(tmp_path, source):
    path = tmp_path / "a.yaml"
    path.write_text(pod("a", "v1"))
    age(path, 100)
    source.poll()
    tmp = tmp_path / ".a.yaml.tmp"
    tmp.write_text(pod("a", "v2"))
    age(tmp, 100)  # same size and same mtime as the old file; only the inode differs
    os.utime(tmp, ns=(path.stat().st_mtime_ns,) * 2)
    os.replace(tmp, path)
    assert source.poll().pods[("shop", "a")].labels["version"] == "v2"


def test_deleted_file_removes_its_objects(tmp_path, source):
    (tmp_path / "a.yaml").write_text(pod("a"))
    (tmp_path / "b.yaml").write_text(pod("b"))
    source.poll()
    (tmp_path / "a.yaml").unlink()
    assert names(source.poll()) == {"b"}
    assert source.poll() is None


@pytest.mark.parametrize("name, text, says", [
    ("pa.yaml", "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict}\n"
                "spec:\n  mtls: {mode: STRICT, mode: PERMISSIVE}\n", "pa.yaml:5: malformed YAML: found key 'mode' twice"),
    ("pa.json", '{"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": {"name": "s"}, '
                '"spec": {"mtls": {"mode": "STRICT", "mode": "PERMISSIVE"}}}',
     "pa.json: malformed JSON: found key 'mode' twice"),
])
def test_a_field_written_twice_refuses_the_file(tmp_path, source, name, text, says):
    """A strict API server and kubectl refuse a field twice; the YAML and JSON parsers kept
    the last one without a word (STRICT then PERMISSIVE: PERMISSIVE, plaintext admitted)."""
    (tmp_path / name).write_text(text)
    source.poll()
    assert source.errors[str(tmp_path / name)].startswith(says)


def test_malformed_file_keeps_last_good_objects_and_records_the_error(tmp_path, source):
    path = tmp_path / "a.yaml"
    path.write_text(pod("a") + "---\n" + pod("a2"))
    assert names(source.poll()) == {"a", "a2"}
    path.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: [broken\n")
    assert source.poll() is None  # nothing the model holds has changed
    assert names(source.model()) == {"a", "a2"}
    assert list(source.errors) == [str(path)]
    assert source.errors[str(path)].startswith("a.yaml:4: malformed YAML")
    assert [e.where for e in source.reported] == ["a.yaml:4"]  # type: ignore[attr-defined]
    assert source.poll() is None
    assert len(source.reported) == 1  # reported once per change, not once per poll
    path.write_text(pod("a3"))
    assert names(source.poll()) == {"a3"}
    assert source.errors == {}


def test_file_with_an_unreadable_service_is_refused_whole(tmp_path, source):
    path = tmp_path / "svc.yaml"
    path.write_text(pod("a"))
    source.poll()
    path.write_text(pod("b") + "---\napiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: shop}\n"
                    "spec: {ports: [{port: http}]}\n")
    assert source.poll() is None
    assert names(source.model()) == {"a"}
    assert source.errors[str(path)] == \
        "svc.yaml#2 (Service shop/s): spec.ports[0].port must be a port number 1-65535, not 'http'"


def test_new_malformed_file_contributes_nothing(tmp_path, source):
    (tmp_path / "good.yaml").write_text(pod("a"))
    source.poll()
    (tmp_path / "bad.yaml").write_text("kind: Pod\n")
    assert source.poll() is None
    assert names(source.model()) == {"a"}
    assert source.errors[str(tmp_path / "bad.yaml")] == "bad.yaml#1: missing apiVersion (every object needs apiVersion and kind)"
    (tmp_path / "bad.yaml").unlink()
    source.poll()
    assert source.errors == {}


def test_subdirectory_and_json(tmp_path, source):
    (tmp_path / "ns" / "shop").mkdir(parents=True)
    (tmp_path / "ns" / "shop" / "a.yaml").write_text(pod("a"))
    doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "j", "namespace": "shop"}}
    (tmp_path / "ns" / "j.json").write_text(json.dumps(doc, indent="\t"))
    assert names(source.poll()) == {"a", "j"}
    assert source.errors == {}


def test_hidden_and_foreign_files_are_ignored(tmp_path, source):
    (tmp_path / ".hidden.yaml").write_text(pod("hidden"))
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.yaml").write_text(pod("in-hidden-dir"))
    (tmp_path / "notes.txt").write_text("not: yaml: at all")
    (tmp_path / "a.yaml.swp").write_text("junk")
    (tmp_path / "a.yaml").write_text(pod("a"))
    assert names(source.poll()) == {"a"}
    assert source.errors == {}


def test_non_utf8_file_is_refused(tmp_path, source):
    (tmp_path / "a.yaml").write_bytes(b"apiVersion: v1\nkind: Pod\nmetadata: {name: \xff}\n")
    assert source.poll() is None
    assert "utf-8" in source.errors[str(tmp_path / "a.yaml")]


@contextmanager
def descriptors_exhausted():
    """Every file descriptor of this process taken (EMFILE), as an agent flooded with
    connections had it; restored on exit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    taken = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
    try:
        while True:
            try:
                taken.append(os.open("/dev/null", os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                break
        yield
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def two_pods(tmp_path, source) -> None:
    (tmp_path / "a.yaml").write_text(pod("a"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text(pod("b"))
    assert names(source.poll()) == {"a", "b"}


def test_a_directory_that_cannot_be_listed_is_no_empty_cluster(tmp_path, source):
    """Issue 9.1: out of descriptors, the scan saw no file and every pod left the mesh."""
    two_pods(tmp_path, source)
    with descriptors_exhausted():
        assert source.poll() is None
    assert source.scan_error.startswith(f"cannot list {tmp_path}") and "Too many open files" in source.scan_error
    assert source.errors == {str(tmp_path): source.scan_error}
    assert names(source.model()) == {"a", "b"}
    assert source.poll() is None and (source.scan_error, source.errors) == (None, {})  # readable: no change
    (tmp_path / "a.yaml").unlink()
    assert names(source.poll()) == {"b"}  # what is read as gone still goes


def test_a_directory_gone_after_it_was_read_keeps_its_objects(tmp_path):
    directory = tmp_path / "cluster"
    directory.mkdir()
    source = FilesSource(directory)
    two_pods(directory, source)
    shutil.rmtree(directory)
    assert source.poll() is None and names(source.model()) == {"a", "b"}
    assert source.scan_error == f"source directory {directory} is gone (recreate it; the objects last read stay in force)"
    directory.write_text("not a directory")
    assert source.poll() is None and source.scan_error == f"source {directory} is not a directory"
    directory.unlink()
    directory.mkdir()
    assert names(source.poll()) == set() and source.scan_error is None  # an empty directory is read as empty
