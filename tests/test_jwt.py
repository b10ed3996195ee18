"""JWT upload tokens against real servers: made by PyJWT with keys from `cryptography`, checked
with a shared secret, a public key file, and a JWKS served (and rotated) by a local server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from upload_server.auth import hash_key

from .conftest import Server, free_port, make_file, sha256_file
from .tus_http import Tus

pytestmark = pytest.mark.frontend

SECRET = "a-shared-secret-of-at-least-32-bytes!"
ISSUER, AUDIENCE = "https://login.example.test/", "uploads"
OPERATOR = "operator-api-key"


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def claims(subject: str = "carol", ttl: float = 300, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": subject, "iat": now, "exp": now + ttl, "iss": ISSUER, "aud": AUDIENCE, **extra}


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwk_of(key: Any, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        algorithm = jwt.algorithms.RSAAlgorithm
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        algorithm = jwt.algorithms.OKPAlgorithm
    else:
        algorithm = jwt.algorithms.ECAlgorithm
    data = json.loads(algorithm.to_jwk(key.public_key()))
    return {**data, "kid": kid, "use": "sig"}


class JwksServer:
    """An identity provider's key set on a local port; `keys` may be changed while it runs."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.requests = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests += 1
                body = json.dumps({"keys": owner.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def keys():
    return {
        "rsa": rsa_key(),
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "rsa2": rsa_key(),
        "ed": ed25519.Ed25519PrivateKey.generate(),
    }


@pytest.fixture(scope="module")
def jwks(keys):
    provider = JwksServer()
    provider.keys = [
        jwk_of(keys["rsa"], "rsa-1"),
        jwk_of(keys["ec"], "ec-1"),
        jwk_of(keys["ed"], "ed-1"),
    ]
    yield provider
    provider.close()


def _start(tmp: Path, args: list[str]) -> Server:
    return Server(tmp / "uploads", args).start()


@pytest.fixture(scope="module")
def provider_server(tmp_path_factory, jwks):
    """Tokens from the shared secret and from the JWKS, with an issuer and an audience."""
    server = _start(
        tmp_path_factory.mktemp("jwks"),
        [
            *("--auth", "true", "--token-secret", SECRET, "--jwks-url", jwks.url),
            *("--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE, "--jwks-refresh-limit", "1s"),
            *("--api-keys", f"operator={hash_key(OPERATOR)}", "--metrics-auth", "true"),
        ],
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def key_file_server(tmp_path_factory, keys):
    """Tokens checked with one RSA public key from a file, and nothing else."""
    directory = tmp_path_factory.mktemp("pem")
    pem = directory / "rsa.pem"
    pem.write_bytes(public_pem(keys["rsa"]))
    server = _start(directory, ["--auth", "true", "--jwt-public-key", str(pem)])
    yield server
    server.stop()


def create(server: Server, token: str, size: int = 10, **kwargs: Any) -> requests.Response:
    client = Tus(server.base)
    client.http.headers.update(bearer(token))
    return client.create(size, **kwargs)


def refused(response: requests.Response, code: str, status: int = 401) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.text
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="upload_server"')


def test_tokens_signed_hs256_rs256_es256_eddsa_are_accepted(provider_server, keys):
    hs = jwt.encode(claims(max=1000, type="text/plain"), SECRET, algorithm="HS256")
    rs = jwt.encode(claims("dave"), keys["rsa"], algorithm="RS256", headers={"kid": "rsa-1"})
    es = jwt.encode(claims("erin"), keys["ec"], algorithm="ES256", headers={"kid": "ec-1"})
    ed = jwt.encode(claims("ivan"), keys["ed"], algorithm="EdDSA", headers={"kid": "ed-1"})
    for token in (hs, rs, es, ed):
        client = Tus(provider_server.base)
        client.http.headers.update(bearer(token))
        url = client.upload(b"x" * 100, filename="a.txt", filetype="text/plain")
        status = requests.get(
            provider_server.url("/upload/status"),
            params={"sessionID": url.rsplit("/", 1)[1]},
            headers=bearer(token),
            timeout=10,
        )
        assert status.status_code == 200 and status.json()["completed"] is True
        # a download link carries the token in its query, as the web page's links do
        assert requests.get(url, params={"access_token": token}, timeout=10).content == b"x" * 100
    # the per-token limits come from claims
    refused(create(provider_server, hs, 1001, filetype="text/plain"), "token_size_exceeded", 413)
    refused(create(provider_server, hs, 10, filetype="image/png"), "type_not_allowed", 403)
    # a session belongs to its token's subject: another subject cannot see it
    url = create(provider_server, rs).headers["Location"]
    other = requests.get(
        provider_server.url("/upload/status"),
        params={"sessionID": url.rsplit("/", 1)[1]},
        headers=bearer(es),
        timeout=10,
    )
    assert other.status_code == 404


def test_bad_tokens_are_refused_with_a_clear_code(provider_server, keys):
    rsa_private = keys["rsa"]

    def rs(payload: dict[str, Any], **headers: Any) -> str:
        return jwt.encode(
            payload, rsa_private, algorithm="RS256", headers={"kid": "rsa-1", **headers}
        )

    refused(create(provider_server, rs(claims(aud="another-api"))), "token_audience")
    no_aud = claims()
    del no_aud["aud"]
    refused(create(provider_server, rs(no_aud)), "token_audience")
    refused(create(provider_server, rs(claims(iss="https://evil.test/"))), "token_issuer")
    refused(create(provider_server, rs(claims(ttl=-120))), "token_expired")
    refused(create(provider_server, rs(claims(nbf=int(time.time()) + 600))), "token_not_yet_valid")
    no_exp = claims()
    del no_exp["exp"]
    refused(create(provider_server, rs(no_exp)), "token_claims")
    refused(create(provider_server, rs(claims(sub=None))), "token_claims")
    refused(create(provider_server, rs(claims(max=-1))), "token_claims")
    # alg none: no signature at all
    unsigned = jwt.encode(claims(), None, algorithm="none")
    refused(create(provider_server, unsigned), "token_algorithm")
    # signed by a key the provider does not publish, under a kid it does publish
    forged = jwt.encode(claims(), keys["rsa2"], algorithm="RS256", headers={"kid": "rsa-1"})
    refused(create(provider_server, forged), "invalid_token")
    # a kid the provider does not know
    refused(create(provider_server, rs(claims(), kid="nobody")), "unknown_kid")
    # an EC key's kid on an RSA token
    refused(create(provider_server, rs(claims(), kid="ec-1")), "token_algorithm")
    # a wrong secret, and garbage that only looks like a JWT
    refused(
        create(provider_server, jwt.encode(claims(), "x" * 40, algorithm="HS256")), "invalid_token"
    )
    refused(create(provider_server, "eyJhbGciOi.x.y"), "invalid_token")


def test_algorithm_confusion_is_refused(key_file_server, keys):
    """An HS256 token signed with the server's RSA public key as its secret: refused, because
    the public key checks RS*/PS* tokens only; the key's type never yields to the token's alg."""
    pem = public_pem(keys["rsa"])
    payload = claims()
    del payload["aud"]
    good = jwt.encode(payload, keys["rsa"], algorithm="RS256")
    assert create(key_file_server, good).status_code == 201
    header = jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}')
    body = jwt.utils.base64url_encode(json.dumps(payload).encode())
    import hashlib
    import hmac

    signature = hmac.new(pem, header + b"." + body, hashlib.sha256).digest()
    confused = b".".join([header, body, jwt.utils.base64url_encode(signature)]).decode()
    refused(create(key_file_server, confused), "token_algorithm")
    # an EC token on an RSA key, and alg none
    es = jwt.encode(payload, keys["ec"], algorithm="ES256")
    refused(create(key_file_server, es), "token_algorithm")
    refused(create(key_file_server, jwt.encode(payload, None, algorithm="none")), "token_algorithm")


def test_the_same_confusion_with_a_secret_configured_fails_the_signature(provider_server, keys):
    """With a secret and a JWKS both configured, an HS256 token is checked with the secret alone."""
    header = jwt.utils.base64url_encode(b'{"alg":"HS256","kid":"rsa-1"}')
    body = jwt.utils.base64url_encode(json.dumps(claims()).encode())
    import hashlib
    import hmac

    pem = public_pem(keys["rsa"])
    signature = hmac.new(pem, header + b"." + body, hashlib.sha256).digest()
    confused = b".".join([header, body, jwt.utils.base64url_encode(signature)]).decode()
    refused(create(provider_server, confused), "invalid_token")


def test_a_rotated_jwks_is_picked_up_without_a_restart(provider_server, jwks, keys):
    new_key = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode(claims(), new_key, algorithm="ES256", headers={"kid": "ec-2"})
    refused(create(provider_server, token), "unknown_kid")
    # forged kids cannot make the server hammer the provider: one fetch per --jwks-refresh-limit
    time.sleep(1.1)
    before, started = jwks.requests, time.monotonic()
    for n in range(30):
        forged = jwt.encode(claims(), new_key, algorithm="ES256", headers={"kid": f"forged-{n}"})
        refused(create(provider_server, forged), "unknown_kid")
    assert jwks.requests - before <= 1 + (time.monotonic() - started) / 1.0
    # the provider rotates: ec-2 in, rsa-1 out
    jwks.keys = [jwk_of(new_key, "ec-2"), jwk_of(keys["ec"], "ec-1")]
    time.sleep(1.1)
    assert create(provider_server, token).status_code == 201
    old = jwt.encode(claims(), keys["rsa"], algorithm="RS256", headers={"kid": "rsa-1"})
    time.sleep(1.1)
    refused(create(provider_server, old), "unknown_kid")
    jwks.keys = [jwk_of(keys[k], f"{k}-1") for k in ("rsa", "ec", "ed")]  # as the others expect
    time.sleep(1.1)


def test_tokens_never_open_the_operator_endpoints(provider_server, keys):
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    scrape = requests.get(provider_server.url("/metrics"), headers=bearer(token), timeout=10)
    refused(scrape, "api_key_required", 403)
    rs = jwt.encode(claims(), keys["rsa"], algorithm="RS256", headers={"kid": "rsa-1"})
    refused(
        requests.get(provider_server.url("/metrics"), headers=bearer(rs), timeout=10),
        "api_key_required",
        403,
    )
    ok = requests.get(provider_server.url("/metrics"), headers=bearer(OPERATOR), timeout=10)
    assert ok.status_code == 200


def test_an_unreachable_jwks_answers_503_and_the_server_still_starts(tmp_path, keys):
    dead = f"http://127.0.0.1:{free_port()}/jwks.json"
    server = _start(tmp_path, ["--auth", "true", "--jwks-url", dead, "--jwks-refresh-limit", "1s"])
    try:
        assert requests.get(server.url("/readyz"), timeout=10).status_code == 200
        payload = claims()
        del payload["aud"]
        token = jwt.encode(payload, keys["rsa"], algorithm="RS256", headers={"kid": "rsa-1"})
        for _ in range(2):
            response = create(server, token)
            refused(response, "auth_unavailable", 503)
            assert "Retry-After" in response.headers
    finally:
        server.stop()
    assert "Traceback" not in server.log()


def test_upload_server_token_mints_a_jwt_the_server_and_upload_client_take(
    provider_server, tmp_path
):
    env = {
        **os.environ,
        "UPLOAD_SERVER_TOKEN_SECRET": SECRET,
        "UPLOAD_SERVER_JWT_ISSUER": ISSUER,
        "UPLOAD_SERVER_JWT_AUDIENCE": AUDIENCE,
    }
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "upload_server.cli",
            "token",
            "--subject",
            "fred",
            "--max-size",
            "1MiB",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    )
    token = made.stdout.strip()
    decoded = jwt.decode(token, SECRET, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER)
    assert decoded["sub"] == "fred" and decoded["max"] == 1024**2
    source = make_file(tmp_path / "small.bin", 300_000, seed=5)
    client_env = {k: v for k, v in os.environ.items() if not k.startswith("UPLOAD_CLIENT_")}
    client_env.update(HOME=str(tmp_path), UPLOAD_CLIENT_TOKEN=token)
    uploaded = subprocess.run(
        [
            *(sys.executable, "-m", "upload_server.client.command", "upload", str(source)),
            *("--server", provider_server.base),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=client_env,
    )
    assert uploaded.returncode == 0, uploaded.stderr
    stored = list((provider_server.upload_dir).glob("small*.bin"))
    assert stored and sha256_file(stored[0]) == sha256_file(source)


def test_tokens_of_the_earlier_format_still_open_the_server(provider_server):
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    body = "ust1." + b64(json.dumps({"sub": "gina", "exp": time.time() + 60}).encode())
    token = body + "." + b64(hmac.new(SECRET.encode(), body.encode(), hashlib.sha256).digest())
    assert create(provider_server, token).status_code == 201


def test_bad_jwt_settings_stop_the_server_at_start(tmp_path):
    def start(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "upload_server.cli", "--upload-dir", str(tmp_path), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    not_pem = tmp_path / "key.pem"
    not_pem.write_text("hello")
    for args, says in (
        (("--auth", "true", "--jwt-public-key", str(not_pem)), "not a PEM public key"),
        (("--auth", "true", "--jwt-public-key", str(tmp_path / "nope")), "cannot read"),
        (("--auth", "true", "--token-secret", SECRET, "--jwt-algorithms", "RS256"), "fit none"),
        (("--jwt-algorithms", "none"), "none is never allowed"),
        (("--jwks-url", "ftp://x"), "not an http(s) URL"),
    ):
        result = start(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert says in result.stderr and "Traceback" not in result.stderr, result.stderr


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=st.dictionaries(
        st.sampled_from(["alg", "kid", "typ", "crit", "b64", "jku", "x5c"]),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(),
            st.text(max_size=8),
            st.sampled_from(["HS256", "RS256", "none", "ES256"]),
            st.lists(st.text(max_size=3), max_size=2),
        ),
    ),
    payload=st.one_of(
        st.binary(max_size=40),
        st.dictionaries(
            st.sampled_from(["sub", "exp", "nbf", "iat", "aud", "iss", "max"]),
            st.one_of(
                st.none(),
                st.integers(),
                st.floats(allow_nan=True),
                st.text(max_size=5),
                st.lists(st.integers(), max_size=2),
            ),
        ).map(lambda d: json.dumps(d).encode()),
    ),
)
def test_any_token_is_refused_or_accepted_never_an_error(header, payload):
    """Whatever a token's header and claims hold, the verifier answers a `TokenRefused` (401) or
    claims, never another exception (a 500)."""
    import hashlib
    import hmac

    from upload_server.auth import Authenticator, Unauthorized
    from upload_server.config import Config

    global _AUTHENTICATOR
    if _AUTHENTICATOR is None:
        _AUTHENTICATOR = Authenticator(Config.load(environ={}, auth="true", token_secret=SECRET))
    head = jwt.utils.base64url_encode(json.dumps(header).encode())
    body = jwt.utils.base64url_encode(payload)
    signature = hmac.new(SECRET.encode(), head + b"." + body, hashlib.sha256).digest()
    token = b".".join([head, body, jwt.utils.base64url_encode(signature)]).decode()
    try:
        _AUTHENTICATOR.authenticate(f"Bearer {token}", None)
    except Unauthorized as refused:
        challenge = refused.headers["WWW-Authenticate"]
        assert challenge.isascii() and challenge.isprintable(), challenge


_AUTHENTICATOR = None
