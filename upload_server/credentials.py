"""`upload-server keygen NAME` and `upload-server token ...`: credentials for `--auth`.

keygen prints a new API key on stderr (give it to the client) and, on stdout, the line for the keys
file, so that `upload-server keygen alice >> keys.txt` stores only the key's SHA-256. token prints
an HS256 JWT upload token, as the application behind the server would issue it with any JWT library
(or `upload_server.auth.issue_token`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .auth import hash_key, new_key
from .config_values import parse_duration, parse_size
from .jwt_tokens import mint

COMMANDS = ("keygen", "token")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="upload-server", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    keygen = commands.add_parser("keygen", help="a new API key and its keys-file line")
    keygen.add_argument("name", help="who the key is for (sessions record it as their owner)")
    token = commands.add_parser("token", help="an HS256 JWT upload token")
    token.add_argument("--subject", required=True, help="who the token is for")
    token.add_argument("--expires-in", default="1h", help="validity (30m, 1h, 7d)")
    token.add_argument("--max-size", help="largest upload allowed (10MiB)")
    token.add_argument("--filename", help="the only filename allowed")
    token.add_argument("--filetype", help="the only content type allowed")
    token.add_argument("--issuer", help="the iss claim (default: UPLOAD_SERVER_JWT_ISSUER)")
    token.add_argument("--audience", help="the aud claim (default: UPLOAD_SERVER_JWT_AUDIENCE)")
    token.add_argument("--secret", help="default: UPLOAD_SERVER_TOKEN_SECRET")
    args = parser.parse_args(argv)
    if args.command == "keygen":
        key = new_key()
        print(
            f"API key for {args.name} (shown once; give it to the client): {key}", file=sys.stderr
        )
        print(f"{args.name} {hash_key(key)}")
        return 0
    secret = args.secret or os.environ.get("UPLOAD_SERVER_TOKEN_SECRET", "")
    if not secret:
        print(
            "upload-server token: give --secret or set UPLOAD_SERVER_TOKEN_SECRET", file=sys.stderr
        )
        return 2
    issuer = args.issuer or os.environ.get("UPLOAD_SERVER_JWT_ISSUER", "")
    audience = args.audience or os.environ.get("UPLOAD_SERVER_JWT_AUDIENCE", "")
    extra = {k: v for k, v in (("iss", issuer), ("aud", audience)) if v}
    try:
        print(
            mint(
                secret,
                args.subject,
                parse_duration(args.expires_in),
                max_size=parse_size(args.max_size) if args.max_size else None,
                filename=args.filename,
                filetype=args.filetype,
                extra=extra,
            )
        )
    except ValueError as exc:
        print(f"upload-server token: {exc}", file=sys.stderr)
        return 2
    return 0
