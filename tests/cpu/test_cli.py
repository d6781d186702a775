"""The `ziggurat` command's tenant-plane subcommands, on a scratch ledger."""

from __future__ import annotations

import json
import time

import pytest

from ziggurat.actors.meter.messages import UsageEvent
from ziggurat.actors.meter.tenancy import TenantPlane
from ziggurat.cluster.cli import main


def run(capsys, *argv) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_tenants_keys_usage_prices_logs(tmp_path, capsys):
    db = str(tmp_path / "t.db")
    out = run(capsys, "tenants", "create", "acme", "--tpm", "1000", "--log-requests", "on", "--db", db)
    tenant = json.loads(out)
    assert tenant["name"] == "acme" and tenant["tokens_per_minute"] == 1000 and tenant["log_requests"]
    out = run(capsys, "keys", "create", "--tenant", "acme", "--models", "m1,m2", "--db", db)
    key = out.splitlines()[0].removeprefix("key: ")
    rec = json.loads(out.splitlines()[1])
    assert key.startswith("zk-" + rec["key_id"]) and rec["models"] == ["m1", "m2"]
    listed = run(capsys, "keys", "list", "--tenant", "acme", "--db", db)
    assert key not in listed and rec["key_id"] in listed
    plane = TenantPlane(db)
    assert plane.authenticate(key)[0].tenant_id == tenant["tenant_id"]
    run(capsys, "keys", "revoke", rec["key_id"], "--db", db)
    assert plane.authenticate(key) == (None, "key revoked")

    now = time.time()
    plane.record([UsageEvent("r1", None, tenant["tenant_id"], rec["key_id"], "m1", None, 0, "cpu",
                             1000, 400, 500, "stop", now, now, 5.0, 50.0)])
    run(capsys, "prices", "set", "m1", "--input", "2", "--cached-input", "1", "--output", "4", "--db", db)
    rows = [json.loads(x) for x in run(capsys, "usage", "--tenant", "acme", "--by", "model", "--db", db).splitlines()]
    assert rows == [{"tenant": tenant["tenant_id"], "model": "m1", "requests": 1, "prompt_tokens": 1000,
                     "cached_tokens": 400, "completion_tokens": 500,
                     "cost": pytest.approx((600 * 2 + 400 * 1 + 500 * 4) / 1e6), "unpriced_tokens": 0}]
    csv = run(capsys, "usage", "--by", "day", "--csv", "--db", db)
    assert csv.splitlines()[0] == "tenant,day,requests,prompt_tokens,cached_tokens,completion_tokens,cost,unpriced_tokens"

    plane.log_request("req-1", tenant["tenant_id"], {"prompt": "hi"}, {"text": "yo"})
    logs = [json.loads(x) for x in run(capsys, "logs", "--tenant", "acme", "--request-id", "req-1", "--db", db).splitlines()]
    assert logs[0]["request"] == {"prompt": "hi"} and logs[0]["response"] == {"text": "yo"}


def test_bad_tenant_input_names_the_field(tmp_path):
    db = str(tmp_path / "t.db")
    plane = TenantPlane(db)
    plane.tenants.create_tenant("acme")
    with pytest.raises(ValueError, match="name: tenant 'acme' already exists"):
        plane.tenants.create_tenant("acme")
    with pytest.raises(ValueError, match="tokens_per_minute: must be a non-negative number"):
        plane.tenants.update_tenant("acme", tokens_per_minute=-5)
    with pytest.raises(ValueError, match="tenant: no tenant with id or name 'nobody'"):
        plane.tenants.create_key("nobody")


def test_secrets_never_come_from_the_command_line(tmp_path, capsys):
    """`ps` shows argv: serve takes keys from files or the environment only."""
    import pytest

    from ziggurat.cluster.cli import read_secret_file

    with pytest.raises(SystemExit) as e:
        main(["serve", "--api-key", "sk-secret"])
    assert e.value.code == 2 and "unrecognized arguments: --api-key" in capsys.readouterr().err
    f = tmp_path / "keys"
    f.write_text("# our keys\nsk-a\n\n  sk-b  \n")
    assert read_secret_file(str(f), "API keys") == ["sk-a", "sk-b"]
    with pytest.raises(SystemExit, match="cannot read API keys file"):
        read_secret_file(str(tmp_path / "missing"), "API keys")
