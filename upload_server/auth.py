"""Who may upload: bearer API keys (stored hashed) and upload tokens (JWTs).

With `--auth` on, every request to the upload APIs carries `Authorization: Bearer <credential>`
(a download link may carry `?access_token=` instead, since a browser cannot add headers to a link).
The credential is either an API key, of which the server knows only the SHA-256, or an upload token
issued by the application behind the server: a JWT (see `jwt_tokens`) signed HS256 with
`--token-secret`, or with a private key whose public half the server has (`--jwt-public-key`,
`--jwks-url`).

Claims: the owner (`sub`, or `--jwt-owner-claim`), `exp` (required), and optionally the per-token
limits (`--jwt-limit-claims`; by default `max`: largest upload in bytes, `name`: the only filename
allowed, `type`: the only content type allowed). Each credential is a `Principal`; a session
belongs to the principal that created it, `token:<owner>` for a token.

The tokens of earlier releases (`ust1.<base64url claims>.<base64url HMAC-SHA256>`, same claims) are
still accepted with `--token-secret` for this release, so that tokens already handed out keep
working through an upgrade; the server no longer issues them.

What only the operator may read (`/metrics` with `--metrics-auth`) takes an API key alone: a token
is handed to end users, so it is refused there (403), whatever it allows.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from . import errors
from .config import Config
from .jwt_tokens import JwtVerifier, TokenRefused, looks_like_jwt, mint

TOKEN_PREFIX = "ust1"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. `id` is what sessions record as their owner."""

    id: str
    max_size: int | None = None
    filename: str | None = None
    filetype: str | None = None


class Unauthorized(errors.UploadError):
    """401. The JSON code says exactly what was wrong; `WWW-Authenticate` speaks RFC 6750: no error
    when no credential came, `invalid_token` for one that is not valid (expired included)."""

    status, code = 401, "unauthorized"

    def __init__(self, message: str, code: str = "unauthorized") -> None:
        challenge = 'Bearer realm="upload_server"'
        if code != "unauthorized":
            # RFC 6750 allows printable ASCII but `"` and `\` here; a token's text may have more
            described = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in message)
            challenge += f', error="invalid_token", error_description="{described}"'
        super().__init__(message, code=code, headers={"WWW-Authenticate": challenge})


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# An HS256 JWT upload token; the application behind the server calls this (or `upload-server
# token`, or any JWT library) and hands the token to its user.
issue_token = mint


def _sign(secret: str, body: str) -> bytes:
    return hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()


class Authenticator:
    def __init__(self, config: Config) -> None:
        self.enabled = config.auth
        self.token_secret = config.token_secret
        self.keys = load_keys(config.api_keys, config.api_keys_file)
        self.jwt = JwtVerifier(config)
        self.owner_claim = config.jwt_owner_claim
        self.limit_claims = dict(config.jwt_limit_claims)
        if self.enabled and not self.keys and not self.jwt.enabled:
            raise ValueError(
                "--auth needs API keys (--api-keys or --api-keys-file) or token keys "
                "(--token-secret, --jwt-public-key or --jwks-url)"
            )
        if config.metrics_auth and not self.keys:
            raise ValueError("--metrics-auth needs API keys (--api-keys or --api-keys-file)")

    def authenticate(self, authorization: str | None, query_token: str | None) -> Principal | None:
        """The caller, or None when authentication is off; Unauthorized otherwise."""
        if not self.enabled:
            return None
        credential = _bearer(authorization) or query_token
        if not credential:
            raise Unauthorized(
                "this server needs a credential: Authorization: Bearer <key or token>"
            )
        if credential.startswith(TOKEN_PREFIX + ".") and self.token_secret:
            return self._verify_token(credential)
        if looks_like_jwt(credential) and self.jwt.enabled:
            return self._verify_jwt(credential)
        key = self._key(credential)
        if key is None:
            raise Unauthorized("the API key or token is not valid", code="invalid_credential")
        return key

    def authenticate_key(self, authorization: str | None) -> Principal:
        """The caller by an API key (whether or not `--auth` is on); Unauthorized without a valid
        one, and 403 for an upload token."""
        credential = _bearer(authorization)
        if not credential:
            raise Unauthorized("this endpoint needs an API key: Authorization: Bearer <key>")
        key = self._key(credential)
        if key is not None:
            return key
        if credential.startswith(TOKEN_PREFIX + ".") or looks_like_jwt(credential):
            raise errors.UploadError(
                "this endpoint takes an API key; an upload token is not accepted here",
                code="api_key_required",
                status=403,
            )
        raise Unauthorized("the API key is not valid", code="invalid_credential")

    def _key(self, credential: str) -> Principal | None:
        name = self.keys.get(hash_key(credential))
        return Principal(f"key:{name}") if name is not None else None

    def _verify_jwt(self, token: str) -> Principal:
        try:
            claims = self.jwt.verify(token)
        except TokenRefused as exc:
            raise Unauthorized(exc.message, code=exc.code) from None
        limits = {name: claims.get(claim) for name, claim in self.limit_claims.items()}
        return _principal(
            claims.get(self.owner_claim),
            limits.get("max_size"),
            limits.get("filename"),
            limits.get("filetype"),
            code="token_claims",
        )

    def _verify_token(self, token: str) -> Principal:
        """A token of the earlier format (`ust1.`), still read for this release."""
        try:
            prefix, claims_b64, signature_b64 = token.split(".")
            signature = _unb64(signature_b64)
        except ValueError:
            raise Unauthorized("the upload token is malformed", code="invalid_token") from None
        expected = _sign(self.token_secret, f"{prefix}.{claims_b64}")
        if not hmac.compare_digest(signature, expected):
            raise Unauthorized("the upload token's signature is not valid", code="invalid_token")
        try:
            claims = json.loads(_unb64(claims_b64))
        except ValueError:
            claims = None
        expires = claims.get("exp") if isinstance(claims, dict) else None
        if not isinstance(claims, dict) or not _is_number(expires):
            raise Unauthorized("the upload token's claims are malformed", code="invalid_token")
        principal = _principal(
            claims.get("sub"),
            claims.get("max"),
            claims.get("name"),
            claims.get("type"),
            code="invalid_token",
        )
        if expires < time.time():  # type: ignore[operator]
            raise Unauthorized("the upload token has expired", code="token_expired")
        return principal


def _principal(
    owner: object, max_size: object, filename: object, filetype: object, *, code: str
) -> Principal:
    """A token's principal from its verified claims; Unauthorized (`code`) when they are not of
    the right types."""
    if not isinstance(owner, str) or not owner:
        raise Unauthorized("the token's owner claim is missing or not a string", code=code)
    if max_size is not None and not (_is_number(max_size) and max_size >= 0):  # type: ignore[operator]
        raise Unauthorized("the token's size limit is not a non-negative number", code=code)
    return Principal(
        f"token:{owner}",
        max_size=int(max_size) if max_size is not None else None,  # type: ignore[call-overload]
        filename=str(filename) if filename is not None else None,
        filetype=str(filetype) if filetype is not None else None,
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("use Authorization: Bearer <key or token>", code="invalid_credential")
    return value.strip()


def load_keys(inline: str, path: Path | None) -> dict[str, str]:
    """{sha256 hex: key name} from `name=hash,...` and from a file of `name hash` lines."""
    pairs: list[tuple[str, str]] = []
    for item in inline.split(","):
        if item.strip():
            name, _, digest = item.strip().partition("=")
            pairs.append((name.strip(), digest.strip()))
    if path is not None:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"cannot read the API keys file {path}: {exc.strerror}") from None
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            if line:
                name, _, digest = line.partition(" ")
                pairs.append((name.strip(), digest.strip().removeprefix("sha256:")))
    keys = {}
    for name, digest in pairs:
        digest = digest.lower().removeprefix("sha256:")
        if not name or not _HEX64.match(digest):
            raise ValueError(f"API key {name!r}: give its name and the SHA-256 hex of the key")
        keys[digest] = name
    return keys


def new_key() -> str:
    return "usk_" + secrets.token_urlsafe(32)


def check_upload(
    principal: Principal | None, size: int | None, filename: str | None, filetype: str | None
) -> None:
    """What a token allows: size, filename and type of a new upload."""
    if principal is None:
        return
    if principal.max_size is not None and size is not None and size > principal.max_size:
        raise errors.TooLarge(
            f"this token allows uploads of at most {principal.max_size} bytes",
            code="token_size_exceeded",
        )
    if principal.max_size is not None and size is None:
        raise errors.BadRequest(
            "this token needs the upload's length up front", code="length_required"
        )
    if principal.filename is not None and filename != principal.filename:
        raise errors.UploadError(
            f"this token allows only the filename {principal.filename!r}",
            code="filename_not_allowed",
            status=403,
        )
    if principal.filetype is not None and filetype != principal.filetype:
        raise errors.UploadError(
            f"this token allows only the type {principal.filetype!r}",
            code="type_not_allowed",
            status=403,
        )
