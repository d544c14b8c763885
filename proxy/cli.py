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
    "keys shred-report": "proxy.keys.commands:cmd_keys_shred_report",
    "audit verify": "proxy.audit.commands:cmd_audit_verify",
    "policy check": "proxy.schema_check:cmd_policy_check",
    "explain": "proxy.explain:cmd_explain",
    "migrate encrypt": "proxy.migrate.commands:cmd_migrate_encrypt",
    "migrate decrypt": "proxy.migrate.commands:cmd_migrate_decrypt",
    "migrate status": "proxy.migrate.commands:cmd_migrate_status",
    "rekey": "proxy.migrate.commands:cmd_rekey",
    "keys rotate --rekey": "proxy.migrate.commands:cmd_keys_rotate_rekey",
}


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would print usage + exit 2 itself
        raise UsageError(f"{self.prog}: {message}")


def _positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value

    return parse


def _batch_options(p: argparse.ArgumentParser) -> None:
    """Pacing of the commands that rewrite a table in the background (migrate, rekey)."""
    p.add_argument("--batch", type=_positive(int), default=1000, metavar="N",
                   help="rows per transaction (default 1000)")
    p.add_argument("--rate", type=_positive(float), metavar="ROWS_PER_S",
                   help="at most this many rows per second (default: no limit)")
    p.add_argument("--dsn", help="the database holding the tables (default: the keystore DSN)")


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
    p = with_config(keys.add_parser("list", help="list data keys (flags expired ones)"))
    p.add_argument("--tenant")
    p.add_argument("--masters", action="store_true", help="list the master keys instead")
    for name in ("create", "rotate"):
        p = with_config(keys.add_parser(name, help=f"{name} a tenant's data key"))
        p.add_argument("--tenant", required=True)
        if name == "rotate":
            p.add_argument("--rekey", action="store_true",
                           help="then re-seal the tenant's cells under the new version")
            _batch_options(p)
            p.add_argument("--destroy-old", action="store_true",
                           help="with --rekey: destroy retired versions no cell uses")
    p = with_config(keys.add_parser("destroy", help="crypto-shred a tenant's data keys"))
    p.add_argument("--tenant", required=True)
    p.add_argument(
        "--yes", action="store_true", help="confirm: the tenant's data becomes unreadable"
    )
    with_config(keys.add_parser("rotate-master", help="new master key; re-wrap every data key"))
    p = with_config(keys.add_parser("shred-report",
                                    help="evidence that a tenant's keys were destroyed"))
    p.add_argument("--tenant", required=True)

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

    migrate = sub.add_parser(
        "migrate", help="encrypt or decrypt an existing column, online"
    ).add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    for name, text in (("encrypt", "plaintext column -> encrypted bytea (policy names its type)"),
                       ("decrypt", "encrypted column -> plaintext column (no lock-in)")):
        p = with_config(migrate.add_parser(name, help=text))
        p.add_argument("column", metavar="SCHEMA.TABLE.COLUMN")
        _batch_options(p)
        p.add_argument("--no-swap", action="store_true",
                       help="stop before the cut-over (the shadow column stays in sync)")
        if name == "encrypt":
            p.add_argument("--tenant", help="tenant of every row (session-tenant tables)")
        else:
            p.add_argument("--type", dest="sql_type", metavar="SQLTYPE",
                           help="type of the plaintext column (default: its type before "
                                "migrate encrypt, else the policy's)")
    with_config(migrate.add_parser("status", help="migrations and rekeys, from their checkpoints"))

    rekey = with_config(sub.add_parser("rekey", help="re-seal cells under the current key version"))
    scope = rekey.add_mutually_exclusive_group(required=True)
    scope.add_argument("--tenant")
    scope.add_argument("--all", action="store_true", help="every tenant with a retired version")
    _batch_options(rekey)
    rekey.add_argument("--destroy-old", action="store_true",
                       help="destroy retired versions no cell uses any more")

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
        elif key in ("hsm", "keys", "audit", "policy", "migrate"):
            raise UsageError(f"pgseal {key}: an action is required (see pgseal {key} --help)")
        if key == "keys rotate" and args.rekey:
            key = "keys rotate --rekey"
        elif key == "keys rotate" and args.destroy_old:
            raise UsageError("pgseal keys rotate: --destroy-old needs --rekey")
        if key == "audit verify" and not (args.file or args.postgres):
            raise UsageError("pgseal audit verify: FILE or --postgres")
        if key in ("migrate encrypt", "migrate decrypt"):
            from proxy.migrate.plan import PlanError, parse_column_spec

            try:
                parse_column_spec(args.column)
            except PlanError as exc:
                raise UsageError(f"pgseal {key}: {exc}") from None
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
