"""Tables the store derives from scores at commit, per model, so questions that would scan every
score read a small table instead (never written directly):
  concept_units   for every (model, concept, scorer) the best CONCEPT_UNITS_TOP units across the
                  model's layers: "concept -> units" reads one row group per model;
  layer_concepts  for every (model, layer, scorer, concept) the rank-0 rows whose concept it is:
                  "concepts per layer" reads ~1 row per distinct best concept, not every score.
Their SQL is schema/derived/<table>.sql."""

from __future__ import annotations

import functools

from ..resources import sql_dir
from .files import hive_types

DERIVED_TABLES = ("concept_units", "layer_concepts")
CONCEPT_UNITS_TOP = 100


@functools.lru_cache(maxsize=None)
def _template(table: str) -> str:
    """schema/derived/<table>.sql without its comment header."""
    lines = (sql_dir("schema") / "derived" / f"{table}.sql").read_text().splitlines()
    while lines and lines[0].startswith("--"):
        lines.pop(0)
    return "\n".join(lines).strip() + "\n"


def derived_select(table: str, src: str, run_id_sql: str) -> str:
    """The SELECT deriving `table` (one of DERIVED_TABLES) from one model's score files `src` (a
    DuckDB list of paths), in the table's file-column order. `run_id_sql` is the run_id of
    layer_concepts rows (concept_units keeps each score's own run_id). Used at commit and, for
    stores written before a derived table existed, inside its view. Only paths quoted by the store,
    a number and a quoted id are substituted: no user value reaches this SQL."""
    if table not in DERIVED_TABLES:
        raise ValueError(f"no derivation for table {table!r}")  # a developer's bug: DERIVED_TABLES lists it
    scores = f"read_parquet({src}, hive_partitioning=true, hive_types={hive_types(('model', 'layer'))})"
    return _template(table).format(scores=scores, top=int(CONCEPT_UNITS_TOP), run_id=run_id_sql)
