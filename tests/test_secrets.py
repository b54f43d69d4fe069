"""A database password and a W&B key never show up anywhere: console, --json, files, W&B runs, errors.

The role's password is recognisable and the server checks it (scram-sha-256: a wrong one is refused), so
the commands really log in with it; what is checked is that no byte written anywhere carries it.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from atlas_distill.db import connect
from atlas_distill.traces.seed import seed_database
from conftest import _create_database, _drop_database

PASSWORD = "S3cr3t-Pa55-xyzzy"
WANDB_KEY = "f4ke0wandb0key0S3CRET0a1b2c3d4e5f6a7b8c9"  # 40 characters, like a real one
SECRETS = (PASSWORD, WANDB_KEY)

TINY_TRAIN = ["--max-steps", "2", "trainer.max_new_tokens=4", "trainer.eval_steps=2", "trainer.eval_max_sessions=2",
              "trainer.per_device_train_batch_size=2", "trainer.logging_steps=1", "trainer.max_length=192",
              "data.prompt=task", "trainer.report_to=[wandb]", "--min-reward", "0.5", "data.review_status=null"]


@pytest.fixture(scope="module")
def secret_role(scram_server):
    """(role, database): a LOGIN role with PASSWORD, allowed to read a seeded database of 80 sessions."""
    role = f"distill_secret_{uuid.uuid4().hex[:8]}"
    name, url = _create_database(scram_server)
    seed_database(url, 80, seed=11)
    with connect(scram_server, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'")
    with connect(url, autocommit=True) as conn:
        conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    yield role, name
    _drop_database(scram_server, name)
    with connect(scram_server, autocommit=True) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {role}")


def role_url(server: str, role: str, dbname: str, *, password: bool = True) -> str:
    """postgresql://role:password@host:port/db (a socket directory goes in ?host=)."""
    parts = conninfo_to_dict(server)
    host, port = parts.get("host", "localhost"), parts.get("port", "5432")
    userinfo = f"{role}:{PASSWORD}" if password else role
    if host.startswith("/"):
        return f"postgresql://{userinfo}@/{dbname}?host={host}&port={port}"
    return f"postgresql://{userinfo}@{host}:{port}/{dbname}"


class Sandbox:
    """Runs the CLI with HOME, TMPDIR, the cache and W&B all inside one directory, then greps all of it."""

    def __init__(self, root: Path, cli):
        self.root, self.cli = root, cli
        self.env = {"HOME": str(root / "home"), "TMPDIR": str(root / "tmp"), "ATLAS_DISTILL_CACHE": str(root / "cache"),
                    "WANDB_DIR": str(root / "wb"), "WANDB_MODE": "offline", "WANDB_API_KEY": WANDB_KEY}
        for key in ("HOME", "TMPDIR", "WANDB_DIR"):
            Path(self.env[key]).mkdir(parents=True, exist_ok=True)
        self.leaks: list[str] = []

    def run(self, *args: str, code: int | tuple[int, ...] = 0, env: dict[str, str] | None = None):
        result = self.cli(*args, env=self.env | (env or {}))
        assert result.code in (code if isinstance(code, tuple) else (code,)), \
            f"{args}: exit {result.code}\n{result.stderr[-3000:]}"
        for stream, text in (("stdout", result.stdout), ("stderr", result.stderr)):
            self.leaks += [f"{stream} of {args[0]}: {s}" for s in SECRETS if s in text]
        return result

    def files_with_secrets(self) -> list[str]:
        found = []
        for path in self.root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                found += [f"{path.relative_to(self.root)}: {s}" for s in SECRETS if s.encode() in data]
        return found


@pytest.fixture
def sandbox(cli, tmp_path) -> Sandbox:
    return Sandbox(tmp_path, cli)


def test_export_and_inspect_never_show_the_password(sandbox, scram_server, secret_role):
    role, dbname = secret_role
    url = role_url(scram_server, role, dbname)
    refused = sandbox.run("export", "--database-url", url.replace(PASSWORD, "not-the-password"), code=4)
    assert "password authentication failed" in refused.stderr  # the server does check the password
    exported = sandbox.run("export", "--database-url", url, "--all-statuses", "--min-reward", "0", "-o", "t.jsonl")
    assert "Exported" in exported.stdout and "***" in exported.stdout  # it logged in with the password
    as_json = sandbox.run("export", "--database-url", url, "--all-statuses", "-o", "t2.jsonl.gz", "--json")
    assert as_json.json()["database"].count("***") == 1
    sandbox.run("inspect", "t.jsonl")
    sandbox.run("inspect", "t.jsonl", "--json", "--plot", "hist.png")
    sandbox.run("inspect", "--database-url", url)
    sandbox.run("inspect", "--database-url", url, "--json")
    sandbox.run("profile", "show", "default", f"database.url={url}")
    without = role_url(scram_server, role, dbname, password=False)
    sandbox.run("export", "--database-url", without, "--all-statuses", "-o", "t3.jsonl", env={"PGPASSWORD": PASSWORD})
    sandbox.run("inspect", "--database-url", without, "--json", env={"PGPASSWORD": PASSWORD})
    assert sandbox.leaks == [] and sandbox.files_with_secrets() == []


def test_error_messages_never_show_the_password(sandbox, scram_server, secret_role):
    role, _ = secret_role
    missing = f"no_such_db_{uuid.uuid4().hex[:6]}"
    without = role_url(scram_server, role, missing, password=False)
    forms = {"url": (role_url(scram_server, role, missing), None),
             "query parameter": (without + ("&" if "?" in without else "?") + f"password={PASSWORD}", None),
             "key=value": (make_conninfo(scram_server, user=role, password=PASSWORD, dbname=missing), None),
             "PGPASSWORD": (without, {"PGPASSWORD": PASSWORD})}
    for form, (url, env) in forms.items():
        for command in (["export", "-o", "x.jsonl"], ["inspect", "--json"]):
            result = sandbox.run(*command, "--database-url", url, code=4, env=env)
            assert f'database "{missing}" does not exist' in result.stderr and "Fix:" in result.stderr, form
    bad_port = f"postgresql://{role}:{PASSWORD}@127.0.0.1:notaport/{missing}"
    result = sandbox.run("export", "--database-url", bad_port, "--json", code=1)
    assert "notaport" in result.stderr and "Fix:" in result.stderr
    assert sandbox.leaks == [] and sandbox.files_with_secrets() == []


@pytest.mark.slow
@pytest.mark.parametrize("where", ["argv", "ATLAS_DB_URL", "PGPASSWORD"])
def test_a_tiny_train_never_writes_the_password_or_the_wandb_key(sandbox, scram_server, secret_role, make_tiny_model,
                                                                where):
    role, dbname = secret_role

    def source(db: str) -> tuple[list[str], dict[str, str]]:
        if where == "argv":
            return ["--database-url", role_url(scram_server, role, db)], {}
        if where == "ATLAS_DB_URL":
            return [], {"ATLAS_DB_URL": role_url(scram_server, role, db)}
        return ["--database-url", role_url(scram_server, role, db, password=False)], {"PGPASSWORD": PASSWORD}

    models = ["--teacher", str(make_tiny_model(seed=2)), "--student", str(make_tiny_model(seed=1))]
    args, env = source(dbname)
    result = sandbox.run("train", *models, *args, "--run-name", "secret", *TINY_TRAIN, "--json", env=env)
    run = sandbox.root / "outputs/gkd/secret"
    assert result.json()["steps"] == 2 and (run / "summary.json").is_file() and (run / "final/README.md").is_file()
    assert list((sandbox.root / "wb" / "wandb").glob("offline-run-*/*.wandb")), "W&B wrote an offline run"
    args, env = source("no_such_db")
    failed = sandbox.run("train", *models, *args, "--run-name", "failed", *TINY_TRAIN, code=4, env=env)
    assert 'database "no_such_db" does not exist' in failed.stderr
    assert sandbox.leaks == [] and sandbox.files_with_secrets() == []
