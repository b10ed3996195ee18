"""Who may upload: bearer API keys (stored hashed) and signed upload tokens.

With `--auth` on, every request to the upload APIs carries `Authorization: Bearer <credential>`
(a download link may carry `?access_token=` instead, since a browser cannot add headers to a link).
The credential is either an API key, of which the server knows only the SHA-256, or an upload token
issued by the application behind the server:

    ust1.<base64url JSON claims>.<base64url HMAC-SHA256 of "ust1.<claims>">

Claims: `sub` (who; required), `exp` (Unix time; required), and optionally `max` (largest upload in
bytes), `name` (the only filename allowed) and `type` (the only content type allowed). Each
credential is a `Principal`; a session belongs to the principal that created it.

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
            challenge += f', error="invalid_token", error_description="{message}"'
        super().__init__(message, code=code, headers={"WWW-Authenticate": challenge})


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue_token(
    secret: str,
    subject: str,
    expires_in: float,
    *,
    max_size: int | None = None,
    filename: str | None = None,
    filetype: str | None = None,
    now: float | None = None,
) -> str:
    """A signed upload token; the application behind the server calls this (or `upload-server
    token`) and hands the token to its user."""
    claims: dict[str, object] = {"sub": subject, "exp": int((now or time.time()) + expires_in)}
    if max_size is not None:
        claims["max"] = max_size
    if filename is not None:
        claims["name"] = filename
    if filetype is not None:
        claims["type"] = filetype
    body = f"{TOKEN_PREFIX}.{_b64(json.dumps(claims, separators=(',', ':')).encode())}"
    return f"{body}.{_b64(_sign(secret, body))}"


def _sign(secret: str, body: str) -> bytes:
    return hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()


class Authenticator:
    def __init__(self, config: Config) -> None:
        self.enabled = config.auth
        self.token_secret = config.token_secret
        self.keys = load_keys(config.api_keys, config.api_keys_file)
        if self.enabled and not self.keys and not self.token_secret:
            raise ValueError(
                "--auth needs API keys (--api-keys or --api-keys-file) or a --token-secret"
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
        if credential.startswith(TOKEN_PREFIX + "."):
            raise errors.UploadError(
                "this endpoint takes an API key; an upload token is not accepted here",
                code="api_key_required",
                status=403,
            )
        raise Unauthorized("the API key is not valid", code="invalid_credential")

    def _key(self, credential: str) -> Principal | None:
        name = self.keys.get(hash_key(credential))
        return Principal(f"key:{name}") if name is not None else None

    def _verify_token(self, token: str) -> Principal:
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
            subject, expires, max_size = claims["sub"], claims["exp"], claims.get("max")
        except (ValueError, KeyError, TypeError):
            subject = None
        if not (
            isinstance(subject, str)
            and subject
            and _is_number(expires)
            and (max_size is None or (_is_number(max_size) and max_size >= 0))
        ):
            raise Unauthorized("the upload token's claims are malformed", code="invalid_token")
        if expires < time.time():
            raise Unauthorized("the upload token has expired", code="token_expired")
        name, filetype = claims.get("name"), claims.get("type")
        return Principal(
            f"token:{subject}",
            max_size=int(max_size) if max_size is not None else None,
            filename=str(name) if name is not None else None,
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
