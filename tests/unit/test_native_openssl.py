"""The pinned OpenSSL of the native HBONE engine (nodeagent/native/openssl.py): a source
whose checksum differs is refused, a crate with a path outside its tree is refused, a
failing build says which step failed with the end of its output, and none of them
leaves anything in the cache a later run would take for built. The built module runs
the pinned release, keeps OpenSSL's symbols to itself (Python's `ssl` keeps the system's
library: test_native_hbone runs both in one process), and its digest covers the pin, so a new pin rebuilds it."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile

import pytest

from engines import ci_enabled
from nodeagent import native
from nodeagent.native import build, openssl


def crate(path, files: dict[str, tuple[bytes, int]]) -> str:
    """A gzipped tar at `path` holding `files` (name: (bytes, mode)); its sha256."""
    with tarfile.open(path, "w:gz") as archive:
        for name, (data, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            archive.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def configure(script: bytes) -> dict[str, tuple[bytes, int]]:
    return {f"{openssl.CRATE}/openssl/Configure": (script, 0o755)}


def test_a_source_with_another_checksum_is_refused_and_nothing_is_cached(tmp_path):
    source = tmp_path / "source.crate"
    digest = crate(source, configure(b"exit 0\n"))
    cache = tmp_path / "cache"
    with pytest.raises(openssl.OpenSSLBuildError) as refused:
        openssl.ensure(lambda line: None, url=source.as_uri(), sha256="0" * 64, root=cache)
    assert str(refused.value) == (f"OpenSSL {openssl.VERSION}: {source.as_uri()} has sha256 {digest}, not the "
                                  f"pinned {'0' * 64}: refused")
    assert list(cache.iterdir()) == []


def test_a_crate_reaching_outside_its_tree_is_refused(tmp_path):
    source = tmp_path / "source.crate"
    digest = crate(source, {**configure(b"exit 0\n"), "../escaped": (b"x", 0o644)})
    cache = tmp_path / "cache"
    with pytest.raises(openssl.OpenSSLBuildError, match=r"source.crate holds '../escaped': refused"):
        openssl.ensure(lambda line: None, url=source.as_uri(), sha256=digest, root=cache)
    assert list(cache.iterdir()) == [] and not (tmp_path / "escaped").exists()


def test_a_failing_build_names_its_step_and_shows_its_output(tmp_path):
    if shutil.which("perl") is None:
        pytest.fail("perl is needed to build OpenSSL (scripts/setup installs it)", pytrace=False)
    source = tmp_path / "source.crate"
    digest = crate(source, configure(b'print "no compiler on this machine\\n"; exit 3;\n'))
    cache = tmp_path / "cache"
    lines = []
    with pytest.raises(openssl.OpenSSLBuildError) as failed:
        openssl.ensure(lines.append, url=source.as_uri(), sha256=digest, root=cache)
    assert str(failed.value) == (f"OpenSSL {openssl.VERSION}: `perl Configure` failed (exit 3); the end of its "
                                 f"output:\nno compiler on this machine")
    assert lines == [f"OpenSSL {openssl.VERSION}: downloading {source.as_uri()}",
                     f"OpenSSL {openssl.VERSION}: building static libssl and libcrypto (about 2 minutes on 2 cores)"]
    assert list(cache.iterdir()) == []


def test_the_digest_covers_the_openssl_pin(monkeypatch):
    before = build.hbone_digest()
    monkeypatch.setattr(openssl, "SHA256", "1" * 64)
    assert build.hbone_digest() != before


@pytest.fixture
def module():
    from nodeagent.native import hbone
    try:
        return hbone.load()
    except native.NativeUnavailable as exc:
        if ci_enabled():
            pytest.fail(f"CI: {exc}", pytrace=False)
        pytest.skip(str(exc))


def test_the_engine_runs_the_pinned_openssl_and_keeps_its_symbols_to_itself(module):
    from nodeagent.native import hbone

    assert hbone.tls_library(module).startswith(f"OpenSSL {openssl.VERSION} ")
    exported = subprocess.run(["nm", "-D", "--defined-only", module.__file__], capture_output=True, text=True,
                              check=True).stdout.split()
    assert [name for name in exported if name.startswith(("SSL_", "EVP_", "OPENSSL_", "BIO_", "X509_"))] == []
    linked = subprocess.run(["ldd", module.__file__], capture_output=True, text=True, check=True).stdout
    assert "libssl" not in linked and "libcrypto" not in linked
