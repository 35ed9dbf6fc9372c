"""PEM in and out of memory and files, for keys and certificates.

Private material is written only through `write_private`: a fresh 0600 file in the
target directory, fsynced and renamed over the old one, so a reader (OpenSSL loading a
workload's key, the CA restarting) sees either the old or the new content, never half
of it, and never a moment where the key is readable by others. `read_private` reads such
a file back only if it still is private: a regular file (not a symlink), owned by us,
mode 0600.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from nodeagent.errors import ConfigError


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` atomically with `data`, created with `mode` (0600 by default)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_private(path: Path) -> bytes:
    """The content of a private file `write_private` made; ConfigError naming `path` if
    it cannot be read or is not private any more (a symlink, another owner, readable or
    writable by others), since then someone else may know or have chosen the key."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        problem = "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot read: {exc.strerror}"
        raise ConfigError(str(path), problem) from None
    try:
        st = os.fstat(fd)  # of what was opened: no race with a rename in between
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(str(path), "is not a regular file")
        if st.st_uid != os.geteuid():
            raise ConfigError(str(path), f"is owned by uid {st.st_uid}, not by this agent (uid {os.geteuid()})")
        if stat.S_IMODE(st.st_mode) != 0o600:
            raise ConfigError(str(path), f"has mode {stat.S_IMODE(st.st_mode):04o}, not 0600")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) if needed; the directory itself is 0700."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def certs_pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_certs(data: bytes, where: str) -> list[x509.Certificate]:
    """Every certificate in a PEM blob; ConfigError naming `where` if there is none."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(where, f"not PEM certificates: {exc}") from None
    return certs


def read_certs(path: Path) -> list[x509.Certificate]:
    try:
        return load_certs(path.read_bytes(), str(path))
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror}") from None


def read_key(path: Path) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(path), f"not an unencrypted PEM private key: {exc}") from None
