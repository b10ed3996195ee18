"""JWT upload tokens, checked with PyJWT: the tokens the application's login already issues.

Three sources of keys, any of them together:

- `--token-secret`: HS256 (HS384, HS512) with a shared secret; `upload-server token` and `mint`
  issue such tokens;
- `--jwt-public-key FILE`: one PEM public key, RSA (RS*/PS*), EC (ES256/384/512 by its curve) or
  Ed25519 (EdDSA);
- `--jwks-url`: an identity provider's key set, fetched with a timeout, cached for
  `--jwks-cache-time` and fetched again for a `kid` it does not hold, at most once per
  `--jwks-refresh-limit` (so forged `kid`s cannot make the server hammer the provider). While no
  key set can be had the token is answered 503 `auth_unavailable`, never 500.

A token's `alg` only chooses among the algorithms that fit the configured keys (`none` never does):
an HMAC token is checked with the secret alone and any other with a public key alone, so a public
key can never serve as an HMAC secret (algorithm confusion). `exp` is required; `nbf` and `iat` are
checked when present, `iss` and `aud` when configured (a token that names an audience is refused
when none is configured), each with `--jwt-leeway`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from . import errors
from .config import Config
from .config_integrations import HMAC_ALGORITHMS, PUBLIC_KEY_ALGORITHMS

log = logging.getLogger("upload_server.auth")
# A short --token-secret is logged once at start-up (`JwtVerifier`), not warned about per request.
warnings.filterwarnings("ignore", category=jwt.warnings.InsecureKeyLengthWarning)

JWKS_TIMEOUT = 5.0  # seconds a JWKS fetch may take
_CURVE_ALGORITHM = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_JWK_CURVE_ALGORITHM = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}


class TokenRefused(Exception):
    """A token that is not valid: `code` says why (the API answers 401 with it)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def looks_like_jwt(credential: str) -> bool:
    """Three base64url segments whose header is a JSON object (`eyJ` is `{"` encoded)."""
    return credential.startswith("eyJ") and credential.count(".") == 2


def mint(
    secret: str,
    subject: str,
    expires_in: float,
    *,
    max_size: int | None = None,
    filename: str | None = None,
    filetype: str | None = None,
    now: float | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """An HS256 upload token with the default claim names (`sub`, `exp`, `max`, `name`,
    `type`), as any JWT library in any language can make it."""
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {"sub": subject, "iat": issued, "exp": int(issued + expires_in)}
    for claim, value in (("max", max_size), ("name", filename), ("type", filetype)):
        if value is not None:
            claims[claim] = value
    claims.update(extra or {})
    return jwt.encode(claims, secret, algorithm="HS256")


def public_key_algorithms(key: Any) -> tuple[str, ...]:
    """The algorithms a public key can check: decided by the key, never by a token."""
    if isinstance(key, rsa.RSAPublicKey):
        return ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _CURVE_ALGORITHM:
        return (_CURVE_ALGORITHM[key.curve.name],)
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ("EdDSA",)
    raise ValueError("--jwt-public-key: an RSA, EC (P-256/384/521) or Ed25519 public key is needed")


def load_public_key(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"--jwt-public-key: cannot read {path}: {exc.strerror}") from None
    try:
        return load_pem_public_key(data)
    except ValueError:
        raise ValueError(f"--jwt-public-key: {path} is not a PEM public key") from None


class JwksCache:
    """An identity provider's key set, fetched when needed and kept; see the module's doc."""

    def __init__(self, url: str, refresh_limit: float, cache_time: float) -> None:
        self.url = url
        self.refresh_limit = refresh_limit
        self.cache_time = cache_time
        self._keys: dict[str, dict[str, Any]] | None = None  # kid -> JWK
        self._fetched_at = 0.0  # monotonic time of the last good fetch
        self._tried_at = -float("inf")  # of the last attempt, good or not
        self._failed = False
        self._lock = threading.Lock()
        self.fetches = 0

    def jwk(self, kid: str | None) -> dict[str, Any]:
        """The JWK named `kid` (with no `kid`, the only key of the set); TokenRefused when the set
        does not hold it, `errors.Unavailable` when no set can be had."""
        with self._lock:
            now = time.monotonic()
            stale = self._keys is None or now - self._fetched_at > self.cache_time
            missing = self._keys is not None and kid is not None and kid not in self._keys
            if (stale or missing) and now - self._tried_at >= self.refresh_limit:
                self._fetch(now)
            keys = self._keys
            if keys is None or (self._failed and kid is not None and kid not in keys):
                raise errors.Unavailable(
                    "the identity provider's keys (JWKS) cannot be fetched; try again later",
                    code="auth_unavailable",
                    headers={"Retry-After": str(max(1, round(self.refresh_limit)))},
                )
        if kid is None:
            if len(keys) == 1:
                return next(iter(keys.values()))
            raise TokenRefused("unknown_kid", "the token names no key (kid) of the key set")
        if kid not in keys:
            raise TokenRefused("unknown_kid", f"the token's key {kid!r} is not in the key set")
        return keys[kid]

    def _fetch(self, now: float) -> None:
        self._tried_at = now
        self.fetches += 1
        try:
            request = urllib.request.Request(
                self.url, headers={"Accept": "application/json", "User-Agent": "upload_server"}
            )
            with urllib.request.urlopen(request, timeout=JWKS_TIMEOUT) as response:
                document = json.loads(response.read(1024 * 1024))
            found = {
                str(k.get("kid", "")): k
                for k in document["keys"]
                if isinstance(k, dict)
                and k.get("kty") in ("RSA", "EC", "OKP")
                and k.get("use", "sig") == "sig"
            }
        except (OSError, ValueError, KeyError, TypeError, urllib.error.URLError) as exc:
            self._failed = True
            log.error("cannot fetch the JWKS from %s: %s", self.url, exc)
            return
        self._keys, self._fetched_at, self._failed = found, now, False
        log.info("fetched the JWKS from %s: %d signing keys", self.url, len(found))


class JwtVerifier:
    """Checks JWT upload tokens against the configured keys and claims."""

    def __init__(self, config: Config) -> None:
        self.secret = config.token_secret
        if self.secret and len(self.secret.encode()) < 32:
            log.warning("--token-secret is shorter than 32 bytes: HS256 wants at least 32")
        self.public_key = None
        key_algorithms: list[str] = []
        if self.secret:
            key_algorithms += HMAC_ALGORITHMS
        if config.jwt_public_key is not None:
            self.public_key = load_public_key(config.jwt_public_key)
            key_algorithms += public_key_algorithms(self.public_key)
        self.jwks = (
            JwksCache(config.jwks_url, config.jwks_refresh_limit, config.jwks_cache_time)
            if config.jwks_url
            else None
        )
        if self.jwks is not None:
            key_algorithms += [a for a in PUBLIC_KEY_ALGORITHMS if a not in key_algorithms]
        wanted = config.jwt_algorithms or tuple(key_algorithms)
        unfit = [a for a in wanted if a not in key_algorithms]
        if unfit:
            raise ValueError(
                f"--jwt-algorithms {', '.join(unfit)} fit none of the keys configured "
                "(HS* need --token-secret; others --jwt-public-key or --jwks-url)"
            )
        self.algorithms = tuple(dict.fromkeys(wanted))
        self.issuer = config.jwt_issuer or None
        # several audiences, comma separated: a token naming any of them is for this server
        self.audience = [a.strip() for a in config.jwt_audience.split(",") if a.strip()] or None
        self.leeway = config.jwt_leeway
        self.owner_claim = config.jwt_owner_claim

    @property
    def enabled(self) -> bool:
        return bool(self.algorithms)

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims once its signature and registered claims are good."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenRefused(
                "invalid_token", f"the token is not a well-formed JWT: {exc}"
            ) from None
        algorithm = header.get("alg")
        if algorithm not in self.algorithms:
            raise TokenRefused(
                "token_algorithm",
                f"the token's algorithm {algorithm!r} is not accepted here "
                f"(accepted: {', '.join(self.algorithms)})",
            )
        key = self._key(algorithm, header.get("kid"))
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp"]},
            )
        except jwt.PyJWTError as exc:
            raise _refusal(exc) from None

    def _key(self, algorithm: str, kid: Any) -> Any:
        """The key for this algorithm: the secret for HMAC, else the public key or the JWKS's."""
        if algorithm in HMAC_ALGORITHMS:
            return self.secret
        if self.jwks is not None and (kid is not None or self.public_key is None):
            if kid is not None and not isinstance(kid, str):
                raise TokenRefused("invalid_token", "the token's kid is not a string")
            jwk = self.jwks.jwk(kid)
            if not _fits(jwk, algorithm):
                raise TokenRefused(
                    "token_algorithm", f"the key {kid!r} is not one for {algorithm} tokens"
                )
            try:
                return jwt.PyJWK(jwk, algorithm=algorithm)
            except (jwt.PyJWTError, ValueError, TypeError, KeyError):
                raise TokenRefused("unknown_kid", f"the key {kid!r} cannot be used") from None
        if self.public_key is not None and algorithm in public_key_algorithms(self.public_key):
            return self.public_key
        raise TokenRefused("token_algorithm", f"no key here checks {algorithm} tokens")


def _fits(jwk: dict[str, Any], algorithm: str) -> bool:
    """Does this JWK serve `algorithm`? Its own `alg`, if it names one, must be the same."""
    if jwk.get("alg") not in (None, algorithm):
        return False
    kty = jwk.get("kty")
    if kty == "RSA":
        return algorithm[:2] in ("RS", "PS")
    if kty == "EC":
        return _JWK_CURVE_ALGORITHM.get(jwk.get("crv", "")) == algorithm
    return kty == "OKP" and algorithm == "EdDSA" and jwk.get("crv") in ("Ed25519", "Ed448")


def _refusal(exc: Exception) -> TokenRefused:
    """PyJWT's reason as a code a client (and its developer) can act on."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return TokenRefused("token_expired", "the upload token has expired")
    if isinstance(exc, jwt.ImmatureSignatureError):
        return TokenRefused("token_not_yet_valid", "the upload token is not valid yet (nbf/iat)")
    if isinstance(exc, jwt.InvalidAudienceError):
        return TokenRefused("token_audience", f"the token's audience (aud) is not this one: {exc}")
    if isinstance(exc, jwt.InvalidIssuerError):
        return TokenRefused("token_issuer", "the token's issuer (iss) is not the one configured")
    if isinstance(exc, jwt.MissingRequiredClaimError):
        code = {"aud": "token_audience", "iss": "token_issuer"}.get(exc.claim, "token_claims")
        return TokenRefused(code, f"the token lacks the {exc.claim!r} claim, which is required")
    if isinstance(exc, jwt.exceptions.InvalidSubjectError | jwt.exceptions.InvalidJTIError):
        return TokenRefused("token_claims", f"the token's claims are not valid: {exc}")
    if isinstance(exc, jwt.InvalidSignatureError):
        return TokenRefused("invalid_token", "the upload token's signature is not valid")
    return TokenRefused("invalid_token", f"the upload token is not valid: {exc}")
