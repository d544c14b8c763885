"""`pgseal explain "SQL"`: what the proxy would do with a statement, and why."""

from __future__ import annotations

import argparse
import sys

from proxy.config import Config
from proxy.errors import PgsealError
from proxy.policy.loader import load_policies
from proxy.rewrite import StatementPlan, analyze


def explain_plan(
    sql: str, plan: StatementPlan, narrow: StatementPlan | None = None
) -> list[str]:
    text = " ".join(sql[plan.start : plan.end].split())
    lines = [f"statement: {text[:200]}"]
    if plan.kind == "refused":
        assert plan.refusal is not None
        lines.append(f"  refused ({plan.refusal.sqlstate}): {plan.refusal.message}")
        lines.append("  nothing of it is forwarded to PostgreSQL")
        return lines
    if plan.kind == "passthrough":
        lines.append("  passthrough: touches no encrypted column; forwarded unchanged")
    for setting in plan.session_settings:
        local = " LOCAL" if setting.local else ""
        value = f" = {setting.value!r}" if setting.value is not None else ""
        lines.append(
            f"  session: {setting.action.upper()}{local} {setting.name}{value} (tracked, forwarded)"
        )
    if plan.kind == "passthrough":
        return lines
    for index in sorted(plan.params):
        target = plan.params[index]
        mode = "deterministic (AES-SIV)" if target.policy.searchable else "randomized (AES-GCM)"
        if target.use == "compare":
            mode = "deterministic (AES-SIV)"
        array = ", each array element" if target.array else ""
        versions = ", under every live key version" if target.versions else ""
        sent = "bytea[]" if target.array or target.versions else "bytea"
        narrow_target = narrow.params.get(index) if narrow is not None else None
        if narrow_target is not None and narrow_target.narrow:
            sent += (
                " (prepared with Parse: one bytea, compared as written, while the tenant "
                "has a single live key version)"
            )
        lines.append(
            f"  ${index}: sealed for {target.column} "
            f"({target.policy.type}, {target.use}, {mode}{array}"
            f"{versions}); tenant from {target.tenant.describe()}; sent as {sent}"
        )
    for literal in plan.literals:
        mode = (
            "deterministic"
            if literal.policy.searchable or literal.use == "compare"
            else "randomized"
        )
        lines.append(
            f"  literal at {literal.start}..{literal.end}: sealed for {literal.column} "
            f"({literal.policy.type}, {literal.use}, {mode}"
            f"{', under every live key version' if literal.versions else ''}); "
            f"tenant from {literal.tenant.describe()}"
        )
    for write in plan.tenant_writes:
        row = "every row" if write.row is None else f"row {write.row + 1}"
        lines.append(
            f"  writes {write.table[0]}.{write.table[1]} ({row}): "
            f"row tenant from {write.source.describe()}"
        )
    if plan.outputs_exact:
        for position, out in enumerate(plan.outputs):
            if out is not None:
                lines.append(
                    f"  output {position + 1} ({out.name}): opened from {out.column} "
                    f"as {out.policy.type}; "
                    f"tenant check: {out.tenant.describe()}"
                )
    else:
        for name, targets in sorted(plan.outputs_by_name.items()):
            for out in targets:
                lines.append(
                    f"  output {name}: opened from {out.column} as {out.policy.type} "
                    "(matched by table and name in RowDescription)"
                )
        if plan.star_tables:
            tables = ", ".join(f"{s}.{t}" for s, t in sorted(plan.star_tables))
            lines.append(f"  * expands {tables}: its encrypted columns are opened")
    if plan.hidden_outputs:
        shown, total = len(plan.outputs) - plan.hidden_outputs, len(plan.outputs)
        which = f"output {total}" if shown + 1 == total else f"outputs {shown + 1}..{total}"
        lines.append(
            f"  {which}: row tenant column(s) the proxy adds to the select (or RETURNING) "
            "list to check each cell against its row; the client never sees them"
        )
    copy = plan.copy
    if copy is not None:
        if copy.table is None:
            what = "COPY (query) TO STDOUT"
        else:
            columns = ", ".join(copy.columns) if copy.columns is not None else "every column"
            pipe = "FROM STDIN" if copy.direction == "from" else "TO STDOUT"
            what = f"COPY {copy.table[0]}.{copy.table[1]} ({columns}) {pipe}"
        action = "sealed" if copy.direction == "from" else "opened"
        lines.append(
            f"  {what}, {copy.options.format} format: encrypted fields {action} row by row"
        )
    return lines


def cmd_explain(args: argparse.Namespace, config: Config) -> int:
    if not config.policies:
        print(
            "pgseal: no policies configured (policies: in the config, or --policies)",
            file=sys.stderr,
        )
        return 1
    try:
        policies = load_policies([config.path(p) for p in config.policies])
    except (PgsealError, ValueError) as exc:
        print(f"pgseal: {exc}", file=sys.stderr)
        return 1
    plans = analyze(args.sql, policies)
    if not plans:
        print("empty statement: forwarded unchanged")
        return 0
    # One statement may be prepared (Parse): its narrow form (see proxy.rewrite).
    narrow = analyze(args.sql, policies, narrow=True)[0] if len(plans) == 1 else None
    for plan in plans:
        print("\n".join(explain_plan(args.sql, plan, narrow)))
    return 0
