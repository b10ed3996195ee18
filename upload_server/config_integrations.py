"""Settings rows for fitting the stacks people already run: JWT upload tokens (a shared secret, a
public key file or an identity provider's JWKS) and tusd-compatible hooks.

They are rows of the one settings table (`config.SETTINGS` splices them in), kept here so that the
table's module stays short; each is a CLI flag and an `UPLOAD_SERVER_*` variable like any other.
"""

from __future__ import annotations

import re

from .config_values import Setting, parse_duration, parse_optional_path, parse_positive_duration

# What a JWT may be signed with, by the kind of key that checks it. `none` is in no list, and a
# secret (HMAC) and a public key are never interchangeable: that is how algorithm confusion is
# kept out (a token's header picks among these only, never the key's type).
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
PUBLIC_KEY_ALGORITHMS = (
    *("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    *("ES256", "ES384", "ES512", "EdDSA"),
)
HOOK_FORMATS = ("native", "tusd")
LIMIT_CLAIMS = ("max_size", "filename", "filetype")


def parse_algorithms(text: str | tuple[str, ...]) -> tuple[str, ...]:
    """A comma list of JWT algorithms; empty means every one that fits the configured keys."""
    if isinstance(text, tuple):
        return text
    names = tuple(a.strip() for a in text.split(",") if a.strip())
    known = {a.upper(): a for a in (*HMAC_ALGORITHMS, *PUBLIC_KEY_ALGORITHMS)}
    unknown = [a for a in names if a.upper() not in known]
    if unknown:
        raise ValueError(
            f"unknown JWT algorithms {unknown} (none is never allowed); use some of "
            f"{', '.join(known.values())}"
        )
    return tuple(known[a.upper()] for a in names)


def parse_claim_name(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("a claim name cannot be empty")
    return value


def parse_limit_claims(text: str | tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """`max_size=max,filename=name,filetype=type`: which claim carries each per-token limit."""
    if isinstance(text, tuple):
        return text
    pairs = []
    for item in text.split(","):
        if not item.strip():
            continue
        limit, _, claim = item.partition("=")
        if limit.strip() not in LIMIT_CLAIMS or not claim.strip():
            raise ValueError(
                f"not LIMIT=CLAIM with LIMIT one of {', '.join(LIMIT_CLAIMS)}: {item.strip()!r}"
            )
        pairs.append((limit.strip(), claim.strip()))
    return tuple(pairs)


def parse_jwks_url(text: str) -> str:
    value = text.strip()
    if value and not re.fullmatch(r"https?://\S+", value):
        raise ValueError(f"not an http(s) URL: {text!r}")
    return value


def parse_hook_format(text: str) -> str:
    value = text.strip().lower()
    if value not in HOOK_FORMATS:
        raise ValueError(f"hook format must be one of {', '.join(HOOK_FORMATS)}, not {text!r}")
    return value


INTEGRATION_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "jwt_public_key",
        parse_optional_path,
        None,
        "PEM public key (RSA, EC or Ed25519) that checks JWT upload tokens.",
        "FILE",
    ),
    Setting("jwks_url", parse_jwks_url, "", "JWKS URL of the identity provider.", "URL"),
    Setting(
        "jwt_algorithms",
        parse_algorithms,
        "",
        "JWT algorithms accepted (default: all that fit the keys configured).",
        "LIST",
    ),
    Setting("jwt_issuer", str, "", "Required JWT `iss` (empty: not checked).", "ISS"),
    Setting(
        "jwt_audience",
        str,
        "",
        "Required JWT `aud`, a comma list (empty: tokens with none).",
        "AUD",
    ),
    Setting("jwt_owner_claim", parse_claim_name, "sub", "JWT claim naming the owner.", "CLAIM"),
    Setting(
        "jwt_limit_claims",
        parse_limit_claims,
        "max_size=max,filename=name,filetype=type",
        "JWT claims holding the per-token limits.",
        "LIST",
    ),
    Setting("jwt_leeway", parse_duration, 30.0, "Clock skew allowed on exp/nbf/iat.", "DURATION"),
    Setting(
        "jwks_refresh_limit",
        parse_positive_duration,
        5.0,
        "Fetch the JWKS at most once per this long (unknown kids, failures).",
        "DURATION",
    ),
    Setting(
        "jwks_cache_time",
        parse_positive_duration,
        600.0,
        "Refresh the JWKS this often.",
        "DURATION",
    ),
    Setting(
        "hook_format",
        parse_hook_format,
        "native",
        "Webhook bodies and answers: native, or tusd (tusd's HTTP hooks).",
        "FORMAT",
    ),
)
