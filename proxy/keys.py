"""Secrets a configuration names by file: read when the configuration is loaded, so that a
missing or weak key is an error of the file (with its field), never of a request."""

from __future__ import annotations

from pathlib import Path

from .model import BalancerPool, FieldError, InvalidBalancerPool


def load_session_keys(specs: list[BalancerPool]) -> dict[str, bytes]:
    """Each pool's session-cookie HMAC key, read from its file at configuration time."""
    keys: dict[str, bytes] = {}
    errors: list[FieldError] = []
    for spec in specs:
        sc = spec.session_cookie
        if sc is None:
            continue
        try:
            key = Path(sc.key_file).read_bytes().strip()
        except OSError as exc:
            errors.append(FieldError("spec.sessionCookie.keyFile",
                                     f"cannot be read: {exc.strerror or exc}", spec.name))
            continue
        if len(key) < 16:
            errors.append(FieldError("spec.sessionCookie.keyFile",
                                     f"holds {len(key)} bytes; a key needs at least 16", spec.name))
            continue
        keys[spec.name] = key
    if errors:
        raise InvalidBalancerPool(errors)
    return keys
