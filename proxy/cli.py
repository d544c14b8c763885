"""The `pgseal` command (DESIGN.md 3).

Exit codes: 0 ok, 1 failure with a one-line reason on stderr, 2 usage.
Every subcommand handler takes (args, config) and returns an exit code; the
handlers live beside the code they drive and are imported lazily so that
`pgseal --help` stays fast and a missing optional module names itself.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from proxy.config import Config, ConfigError, load_config
from proxy.errors import PgsealError

Handler = Callable[[argparse.Namespace, Config], int]

# subcommand path -> "module:function"
HANDLERS: dict[str, str] = {
    "serve": "proxy.server.app:cmd_serve",
    "demo": "proxy.demo:cmd_demo",
    "hsm init": "proxy.keys.commands:cmd_hsm_init",
    "keys list": "proxy.keys.commands:cmd_keys_list",
    "keys create": "proxy.keys.commands:cmd_keys_create",
    "keys rotate": "proxy.keys.commands:cmd_keys_rotate",
    "keys destroy": "proxy.keys.commands:cmd_keys_destroy",
    "keys rotate-master": "proxy.keys.commands:cmd_keys_rotate_master",
    "audit verify": "proxy.audit.commands:cmd_audit_verify",
    "policy check": "proxy.schema_check:cmd_policy_check",
    "explain": "proxy.explain:cmd_explain",
}


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would print usage + exit 2 itself
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pgseal", description="Field-encryption proxy for PostgreSQL")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", metavar="FILE", help="YAML config (default: $PGSEAL_CONFIG)")
        return p

    serve = with_config(sub.add_parser("serve", help="run the proxy"))
    serve.add_argument("--listen", metavar="HOST:PORT")
    serve.add_argument("--upstream", metavar="HOST:PORT")
    serve.add_argument("--policies", metavar="PATH", action="append")
    serve.add_argument("--workers", type=int, metavar="N")

    demo = with_config(sub.add_parser("demo", help="throwaway PostgreSQL + SoftHSM2 token + proxy"))
    demo.add_argument("--listen", metavar="HOST:PORT")
    demo.add_argument("--dir", default=".pgseal", help="where the demo keeps its state")

    hsm = sub.add_parser("hsm", help="HSM token and master key").add_subparsers(
        dest="action", metavar="ACTION", parser_class=_Parser
    )
    with_config(hsm.add_parser("init", help="create the SoftHSM2 token and master key"))

    keys = sub.add_parser("keys", help="tenant data keys").add_subparsers(
        dest="action", metavar="ACTION", parser_class=_Parser
    )
    p = with_config(keys.add_parser("list", help="list data keys"))
    p.add_argument("--tenant")
    for name in ("create", "rotate"):
        p = with_config(keys.add_parser(name, help=f"{name} a tenant's data key"))
        p.add_argument("--tenant", required=True)
    p = with_config(keys.add_parser("destroy", help="crypto-shred a tenant's data keys"))
    p.add_argument("--tenant", required=True)
    p.add_argument(
        "--yes", action="store_true", help="confirm: the tenant's data becomes unreadable"
    )
    with_config(keys.add_parser("rotate-master", help="new master key; re-wrap every data key"))

    audit = sub.add_parser("audit", help="audit trail").add_subparsers(
        dest="action", metavar="ACTION", parser_class=_Parser
    )
    p = with_config(audit.add_parser("verify", help="check the hash chain"))
    p.add_argument("file", nargs="?", metavar="FILE")
    p.add_argument("--postgres", action="store_true", help="verify the postgres sink's table")

    policy = sub.add_parser("policy", help="column policies").add_subparsers(
        dest="action", metavar="ACTION", parser_class=_Parser
    )
    check = with_config(policy.add_parser("check", help="policy vs the live schema"))
    check.add_argument("--policies", metavar="PATH", action="append")
    check.add_argument("--dsn", help="database to check (default: the keystore DSN)")

    explain = with_config(
        sub.add_parser("explain", help="what the proxy would do with a statement")
    )
    explain.add_argument("sql", metavar="SQL")
    explain.add_argument("--policies", metavar="PATH", action="append")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("listen", "upstream", "workers"):
        if getattr(args, key, None) is not None:
            out[key] = getattr(args, key)
    if getattr(args, "policies", None):
        out["policies"] = args.policies
    return out


def _handler(key: str) -> Handler:
    module_name, _, func = HANDLERS[key].partition(":")
    module = importlib.import_module(module_name)
    handler: Handler = getattr(module, func)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        key = args.command
        if key is None:
            raise UsageError("pgseal: a command is required (see pgseal --help)")
        if getattr(args, "action", None) is not None:
            key = f"{key} {args.action}"
        elif key in ("hsm", "keys", "audit", "policy"):
            raise UsageError(f"pgseal {key}: an action is required (see pgseal {key} --help)")
        if key == "audit verify" and not (args.file or args.postgres):
            raise UsageError("pgseal audit verify: FILE or --postgres")
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        config = load_config(getattr(args, "config", None), _overrides(args))
        return _handler(key)(args, config)
    except (ConfigError, PgsealError) as exc:
        print(f"pgseal: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
