"""Typed errors of the identity subsystem.

The CA maps its refusals to gRPC status codes (Unauthenticated -> UNAUTHENTICATED,
PermissionDenied -> PERMISSION_DENIED, CsrRejected -> INVALID_ARGUMENT); the agent's
client maps status codes back (CaRefused, CaUnavailable). Messages say why and, where
there is something to do, what.
"""

from __future__ import annotations

from nodeagent.errors import NodeagentError


class IdentityError(NodeagentError):
    """Base of the identity subsystem's errors."""


class CertificateIdentityError(IdentityError):
    """A certificate does not carry exactly one SPIFFE URI SAN."""


class CsrRejected(IdentityError):
    """The CA refuses a certificate signing request (signature, key, SANs)."""


class SignerExpired(IdentityError):
    """The CA's own certificate chain has expired: nothing can be issued until it is renewed."""


class Unauthenticated(IdentityError):
    """The caller of the CA presented no token or an unknown one."""


class PermissionDenied(IdentityError):
    """The caller is known but may not have the identity it asked for."""


class CaUnavailable(IdentityError):
    """The CA could not be reached or did not answer in time (retried with backoff)."""


class CaRefused(IdentityError):
    """The CA answered with a refusal; `code` is the gRPC status code name."""

    def __init__(self, code: str, message: str, hint: str | None = None):
        self.code = code
        super().__init__(f"CA refused ({code}): {message}", hint)


class IssuedCertificateInvalid(IdentityError):
    """What the CA returned is not a usable certificate for the identity asked for."""


class IdentityUnavailable(IdentityError):
    """No valid certificate for an identity yet (or any more); the manager keeps retrying."""
