"""Whether a JSON Web Key Set is one Envoy's jwt_authn takes.

Envoy (jwt_verify_lib) reads every key of a set, skips those it cannot use, and refuses
the set when none is left ("Jwks doesn't have any valid public key"): the waypoint's
whole snapshot is then NACKed. So a set is checked here as Envoy reads it: an inline
`jwks` (validation refuses a RequestAuthentication whose set is no JWKS at all; one
without a usable key gives its issuer a set no token matches, translate/jwt.py) and a
fetched `jwksUri` answer (the fetcher keeps the last good keys). A key is usable when its `kty` is one Envoy
implements with the parameters it needs, the public key builds (an RSA modulus, a point
on the named curve), and an `alg`, when present, belongs to that type (ALG_PREFIXES).
Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import json

from cryptography.hazmat.primitives.asymmetric import ec, rsa

HINT = 'it must be a JSON object whose "keys" list holds at least one public key Envoy can use (RSA, EC, oct, OKP)'
# As jwt_verify_lib reads a key (Envoy's source/common/jwt/jwks.cc): an `alg`, when given,
# begins with its type's prefix; an EC key without `crv` takes it from its `alg`, else P-256;
# an RSA exponent is 3 or 65537 (BoringSSL takes no other).
ALG_PREFIXES = {"RSA": ("RS", "PS"), "EC": ("ES",), "oct": ("HS",), "OKP": ("EdDSA",)}
CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}
CURVE_OF_ALG = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
RSA_EXPONENTS = (3, 65537)


def problem(text: str, usable_key: bool = True) -> str | None:
    """Why `text` is no key set Envoy takes; None when it is one. With `usable_key` False,
    only its form is checked (validation: a set without a usable key is no reason to
    refuse a RequestAuthentication, whose other rules may be good; the translation gives
    its issuer a set no token matches, with a warning)."""
    try:
        keys = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return f"is not JSON ({type(exc).__name__})"
    if not isinstance(keys, dict) or not isinstance(keys.get("keys"), list):
        return "is not a JSON Web Key Set"
    if usable_key and not any(usable(key) for key in keys["keys"]):
        return "has no key Envoy can use"
    return None


def usable(key: object) -> bool:
    if not isinstance(key, dict) or not isinstance(key.get("kty"), str):
        return False
    kty, alg = key["kty"], key.get("alg")
    if kty not in ALG_PREFIXES or (alg is not None and (not isinstance(alg, str)
                                                        or not alg.startswith(ALG_PREFIXES[kty]))):
        return False
    try:
        if kty == "RSA":
            exponent = _int(key, "e")
            if exponent not in RSA_EXPONENTS:
                return False
            rsa.RSAPublicNumbers(exponent, _int(key, "n")).public_key()
            return True
        if kty == "EC":
            crv = key.get("crv") or CURVE_OF_ALG.get(alg or "", "P-256")
            if crv not in CURVES or (alg is not None and CURVE_OF_ALG.get(alg) != crv):
                return False
            ec.EllipticCurvePublicNumbers(_int(key, "x"), _int(key, "y"), CURVES[crv]()).public_key()
            return True
        if kty == "oct":
            return len(_bytes(key, "k")) > 0
        return key.get("crv") == "Ed25519" and len(_bytes(key, "x")) == 32  # OKP
    except (ValueError, TypeError, binascii.Error):
        return False


def _bytes(key: dict, name: str) -> bytes:
    value = key.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{name} is not a string")
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def _int(key: dict, name: str) -> int:
    return int.from_bytes(_bytes(key, name), "big")
