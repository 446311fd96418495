"""`ondemand token create NAME --scopes ...`: a new bearer token, printed once, and the
`[[tokens]]` table to paste into config.toml (the daemon keeps only the token's SHA-256).
No daemon is asked: a token exists once its table is in the config and the daemon restarted."""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import sys

from ondemand.config import SCOPES, token_name
from ondemand.errors import ConfigError

TOKEN_BYTES = 32  # 256 random bits, 43 URL-safe characters


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("token", help="scoped bearer tokens for the daemon ([[tokens]])")
    tsub = p.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    c = tsub.add_parser("create", help="make a token: printed once, with the table to paste",
                        description="Print a new random token (once: it is not stored "
                        "anywhere) and the [[tokens]] table holding its SHA-256 for "
                        "config.toml.  Restart the daemon to use it.")
    c.add_argument("name", help="the token's name: owner of its jobs, label in the cost report")
    c.add_argument("--scopes", default="jobs",
                   help=f"comma-separated, of {', '.join(SCOPES)} (default: jobs)")
    c.add_argument("--max-pending", type=int, default=0,
                   help="jobs queued or running at once (default 0 = no limit)")
    c.add_argument("--submits-per-minute", type=int, default=0,
                   help="submissions per rolling minute (default 0 = no limit)")
    c.set_defaults(func=cmd_create)


def table(name: str, digest: str, scopes: list[str], max_pending: int,
          submits_per_minute: int) -> str:
    return ("[[tokens]]\n"
            f"name = {json.dumps(name)}\n"
            f"sha256 = \"{digest}\"\n"
            f"scopes = [{', '.join(json.dumps(s) for s in scopes)}]\n"
            f"max_pending = {max_pending}\n"
            f"submits_per_minute = {submits_per_minute}\n")


def cmd_create(args: argparse.Namespace) -> int:
    problem = token_name(args.name)
    if problem:
        raise ConfigError(f"NAME: {problem}")
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ConfigError(f"--scopes: must be a comma-separated list of {', '.join(SCOPES)}, "
                          f"got {args.scopes!r}")
    if args.max_pending < 0 or args.submits_per_minute < 0:
        raise ConfigError("--max-pending and --submits-per-minute must be >= 0 (0 = no limit)")
    token = secrets.token_urlsafe(TOKEN_BYTES)
    digest = hashlib.sha256(token.encode()).hexdigest()
    out = sys.stdout
    out.write(f"token for {args.name!r} (shown once; give it to its user, it is not stored):\n")
    out.write(f"{token}\n\n")
    out.write("# add to config.toml, then restart the daemon:\n")
    out.write(table(args.name, digest, scopes, args.max_pending, args.submits_per_minute))
    return 0
