"""`atlas-distill demo-db`: create the Atlas schema and fill it with synthetic sessions."""

from __future__ import annotations

from typing import Annotated

import typer

from ..config import load_profile
from ..db import mask_url, require_db_url
from ..traces.seed import seed_database
from ._common import DbUrlOpt, JsonOpt, OverridesArg, ProfileOpt, out, print_json, progress_bar, reporting_errors


def demo_db(
    overrides: OverridesArg = None,
    database_url: DbUrlOpt = None,
    sessions: Annotated[int, typer.Option(min=1, help="How many sessions to create.")] = 2000,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same sessions.")] = 0,
    append: Annotated[bool, typer.Option(help="Add to a store that already holds sessions.")] = False,
    profile: ProfileOpt = "default",
    json_out: JsonOpt = False,
) -> None:
    """Create the Atlas tables (if missing) and insert realistic synthetic CRM sessions."""
    with reporting_errors(json_out):
        config = load_profile(profile, overrides)
        url = require_db_url(database_url, config.database.url)
        with progress_bar("Seeding") as update:
            result = seed_database(url, sessions, seed=seed, append=append, progress=update)
    summary = {"database": mask_url(url), "sessions": result.sessions, "steps": result.steps,
               "events": result.events, "first_id": result.first_id, "last_id": result.last_id}
    if json_out:
        print_json(summary)
        return
    out.print(f"Created {result.sessions} sessions (ids {result.first_id}-{result.last_id}), {result.steps} steps, "
              f"{result.events} trajectory events in {summary['database']}", markup=False)
