"""Database URLs and connections: resolution, password masking, errors with fixes."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from .errors import DatabaseError, UsageError

if TYPE_CHECKING:
    import psycopg

ENV_DB_URL = "ATLAS_DB_URL"
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)(?=@)")
_KV_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<pw>'(?:[^'\\]|\\.)*'|\S+)")


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***, in URL or key=value form."""
    masked = _URL_PASSWORD.sub(lambda m: m["head"] + ("***" if m["pw"] else ""), url)
    return _KV_PASSWORD.sub(lambda m: m["head"] + "***", masked)


def url_password(url: str) -> str | None:
    """The password a URL carries: in its user info, a `?password=` parameter, or key=value form."""
    if "://" in url:
        try:
            parts = urlsplit(url)
            return parts.password or next(iter(parse_qs(parts.query).get("password", [])), None) or None
        except ValueError:
            return None
    match = _KV_PASSWORD.search(url)
    return match["pw"].strip("'") if match else None


def scrub(text: str, url: str | None) -> str:
    """Remove every trace of the URL's password (and PGPASSWORD) from a message."""
    for secret in (url_password(url) if url else None, os.environ.get("PGPASSWORD")):
        if secret and len(secret) >= 3:
            text = text.replace(secret, "***")
    return mask_url(text)


def masked_argv(argv: list[str]) -> list[str]:
    """Command-line arguments with every password masked: what may be shown to libraries that record
    sys.argv (W&B stores it in its run files)."""
    return [mask_url(arg) for arg in argv]


def resolve_db_url(flag: str | None, profile_url: str | None) -> str | None:
    """--database-url, then the profile's database.url, then $ATLAS_DB_URL; a URL that cannot be read is a
    usage error here, before any connection is tried."""
    url = flag or profile_url or os.environ.get(ENV_DB_URL) or None
    if url:
        _check_url(url)
    return url


def _check_url(url: str) -> None:
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    fix = ("Write it as postgresql://user:password@host:5432/database (or in libpq's key=value form, "
           "host=... port=... dbname=...).")
    try:
        params = conninfo_to_dict(url)
    except ProgrammingError as exc:
        detail = scrub(str(exc).strip().splitlines()[0], url).rstrip(".")
        raise UsageError(f"The database URL {mask_url(url)} cannot be read: {detail}.", fix=fix) from None
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise UsageError(f"The database URL {mask_url(url)} has port {port!r}, which is not a port number "
                             "(1 to 65535).", fix=fix)


def require_db_url(flag: str | None, profile_url: str | None) -> str:
    url = resolve_db_url(flag, profile_url)
    if not url:
        raise UsageError(
            "No database URL given.",
            fix=f"Pass --database-url postgresql://user@host:5432/atlas, set {ENV_DB_URL}, "
            "or set database.url in the profile.",
        )
    return url


def _diagnose(exc: Exception, url: str) -> DatabaseError:
    where = mask_url(url)
    detail = scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, url)
    lowered = detail.lower()
    if "password authentication failed" in lowered or "no password supplied" in lowered:
        fix = "Check the user and password in the URL (or PGPASSWORD) for this server."
    elif "does not exist" in lowered and "database" in lowered:
        fix = "Check the database name at the end of the URL; ATLAS_DB_URL must point at the Atlas store."
    elif "refused" in lowered or "no such file" in lowered or "timeout" in lowered or "could not translate" in lowered:
        fix = "Check that the server is running and that host and port in ATLAS_DB_URL are right."
    else:
        fix = "Check ATLAS_DB_URL points at the right cluster and that the server accepts connections."
    return DatabaseError(f"Cannot connect to the database at {where}: {detail}.", fix=fix)


def connect(url: str, *, autocommit: bool = False, application_name: str = "atlas-distill") -> psycopg.Connection:
    """A connection; `application_name` is what pg_stat_activity shows (and what a DBA terminates by)."""
    import psycopg

    try:
        return psycopg.connect(url, connect_timeout=10, autocommit=autocommit, application_name=application_name)
    except psycopg.ProgrammingError as exc:
        raise UsageError(
            f"The database URL {mask_url(url)} is not valid: {scrub(str(exc), url)}.",
            fix="Write it as postgresql://user:password@host:5432/dbname.",
        ) from None
    except psycopg.OperationalError as exc:
        raise _diagnose(exc, url) from None


def query_error(exc: Exception, url: str) -> DatabaseError:
    """A failed query, translated: a missing Atlas table gets its own fix."""
    import psycopg.errors

    detail = scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, url)
    if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn):
        return DatabaseError(
            f"The database at {mask_url(url)} does not hold the Atlas schema ({detail}).",
            fix="Point --database-url / ATLAS_DB_URL at the Atlas store, or create demo data with "
            "`atlas-distill demo-db --database-url ...`.",
        )
    if isinstance(exc, psycopg.OperationalError):
        return _diagnose(exc, url)
    return DatabaseError(f"A query on {mask_url(url)} failed: {detail}.", fix="See the server log for details.")


def check_database(url: str) -> None:
    """Fail now, with the error reading would give, when the store cannot be reached or holds no Atlas
    sessions table: before minutes of model preparation, not after."""
    import psycopg

    with connect(url) as conn:
        try:
            conn.execute("SELECT 1 FROM sessions LIMIT 0")
        except psycopg.Error as exc:
            raise query_error(exc, url) from None


@contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    """A real PostgreSQL from the pgserver wheel, for machines without a server; stopped on exit."""
    import pgserver

    data_dir.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(data_dir, cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


def with_database(url: str, dbname: str) -> str:
    """The same server and credentials, another database."""
    from psycopg.conninfo import make_conninfo

    return make_conninfo(url, dbname=dbname)
