"""`ziggurat tenants|keys|usage|prices|logs`: the tenant plane from the shell.

They work on the ledger database directly (`--db`, or ZIGGURAT_DB, default
~/.cache/ziggurat/tenancy.db); SQLite in WAL mode lets them run beside a
live server.
"""

from __future__ import annotations

import json
import sys
import time


def _db(args) -> str:
    from ziggurat.cluster.spec import ledger_url

    return ledger_url(args.db)


def _plane(args):
    from ziggurat.actors.meter.tenancy import TenantPlane

    return TenantPlane(_db(args))


def _print(rows) -> None:
    for r in rows:
        print(json.dumps(r, default=str))


def _limits(args) -> dict:
    out = {}
    for k in ("requests_per_minute", "tokens_per_minute", "monthly_token_cap", "monthly_spend_cap",
              "log_retention_days"):
        v = getattr(args, k, None)
        if v is not None:
            out[k] = v
    if getattr(args, "log_requests", None) is not None:
        out["log_requests"] = args.log_requests == "on"
    return out


def tenants_cmd(args) -> int:
    from dataclasses import asdict

    p = _plane(args)
    if args.action == "create":
        _print([asdict(p.tenants.create_tenant(args.name, **_limits(args)))])
    elif args.action == "update":
        _print([asdict(p.tenants.update_tenant(args.name, **_limits(args)))])
    else:
        _print([asdict(t) for t in p.tenants.tenants()])
    return 0


def keys_cmd(args) -> int:
    p = _plane(args)
    if args.action == "create":
        key, rec = p.tenants.create_key(args.tenant, expires_in_s=args.expires_in_days * 86400 if args.expires_in_days else None,
                                        models=args.models.split(",") if args.models else None,
                                        requests_per_minute=args.requests_per_minute,
                                        tokens_per_minute=args.tokens_per_minute)
        print(f"key: {key}")
        print("Store it now: it is shown once and only its salted hash is kept.", file=sys.stderr)
        _print([rec.public()])
    elif args.action == "revoke":
        if not p.tenants.revoke_key(args.key_id):
            print(f"no active key {args.key_id!r}", file=sys.stderr)
            return 1
        print(f"revoked {args.key_id}")
    else:
        _print([k.public() for k in p.tenants.keys(args.tenant)])
    return 0


def usage_cmd(args) -> int:
    from ziggurat.actors.ingress.admin import parse_time
    from ziggurat.actors.meter.ledger import to_csv

    rows = _plane(args).usage(args.tenant, parse_time(args.since, "since") or 0.0, parse_time(args.until, "until"),
                              args.by)
    if args.csv:
        sys.stdout.write(to_csv(rows))
    else:
        _print(rows)
    return 0


def prices_cmd(args) -> int:
    p = _plane(args)
    if args.action == "set":
        p.set_price(args.model, args.input, args.cached_input, args.output)
    _print([vars(x) for x in p.ledger.prices().values()])
    return 0


def logs_cmd(args) -> int:
    p = _plane(args)
    if args.purge:
        print(f"purged {p.purge_logs()} log records past retention")
        return 0
    rows = p.logs(args.tenant, args.request_id)
    for r in rows:
        r["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["created_at"]))
    _print(rows)
    return 0


def add_tenant_commands(sub) -> None:
    def with_db(p):
        p.add_argument("--db", default=None, help="ledger: SQLite path or postgresql:// URL (or ZIGGURAT_DB)")
        return p

    def limit_args(p):
        p.add_argument("--requests-per-minute", "--rpm", dest="requests_per_minute", type=int)
        p.add_argument("--tokens-per-minute", "--tpm", dest="tokens_per_minute", type=int)
        p.add_argument("--monthly-token-cap", type=int)
        p.add_argument("--monthly-spend-cap", type=float)
        p.add_argument("--log-requests", choices=["on", "off"])
        p.add_argument("--log-retention-days", type=int)

    t = with_db(sub.add_parser("tenants", help="create, update or list tenants"))
    t.add_argument("action", choices=["create", "update", "list"])
    t.add_argument("name", nargs="?")
    limit_args(t)
    t.set_defaults(fn=tenants_cmd)

    k = with_db(sub.add_parser("keys", help="create, revoke or list API keys"))
    k.add_argument("action", choices=["create", "revoke", "list"])
    k.add_argument("key_id", nargs="?")
    k.add_argument("--tenant")
    k.add_argument("--expires-in-days", type=float)
    k.add_argument("--models", help="comma-separated allow-list")
    k.add_argument("--requests-per-minute", "--rpm", dest="requests_per_minute", type=int)
    k.add_argument("--tokens-per-minute", "--tpm", dest="tokens_per_minute", type=int)
    k.set_defaults(fn=keys_cmd)

    u = with_db(sub.add_parser("usage", help="rated usage per tenant"))
    u.add_argument("--tenant")
    u.add_argument("--since")
    u.add_argument("--until")
    u.add_argument("--by", choices=["model", "key", "day"])
    u.add_argument("--csv", action="store_true")
    u.set_defaults(fn=usage_cmd)

    pr = with_db(sub.add_parser("prices", help="set or list prices per million tokens"))
    pr.add_argument("action", choices=["set", "list"])
    pr.add_argument("model", nargs="?")
    pr.add_argument("--input", type=float, default=0.0)
    pr.add_argument("--cached-input", type=float, default=0.0)
    pr.add_argument("--output", type=float, default=0.0)
    pr.set_defaults(fn=prices_cmd)

    lg = with_db(sub.add_parser("logs", help="request/response logs of a tenant"))
    lg.add_argument("--tenant")
    lg.add_argument("--request-id")
    lg.add_argument("--purge", action="store_true", help="delete records past each tenant's retention")
    lg.set_defaults(fn=logs_cmd)
