"""Export: a store's committed tables copied out as plain Parquet with load.sql and the schema DDL,
and the load.sql every commit leaves in the store, so plain duckdb reads either without neurostore."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..errors import BadInput, StoreDamaged
from .files import _atomic_write


class Export:
    """The Store's export and load.sql (mixed into Store)."""

    def _write_load_sql(self, man: dict) -> None:
        """<store>/load.sql: views over the committed files, for plain duckdb run from the store folder."""
        _atomic_write(self.path / "load.sql", self._load_sql(man, root=""))

    def _load_sql(self, man: dict, root: str) -> str:
        lines = ["-- Recreates the neurostore views over this snapshot's Parquet files.",
                 "-- Run from this folder: duckdb -c \".read load.sql\" (paths are relative to it).", ""]
        for name in self.tables():
            lines.append(f"-- {self.schemas[name].description}")
            lines.append(f'CREATE OR REPLACE VIEW "{name}" AS {self.view_sql(name, man, root=root)};')
        from ..sqlfuncs import PYTHON_UDFS, macro_statements

        plain, python = [], []
        for m in macro_statements():
            (python if any(f in m for f in PYTHON_UDFS) else plain).append(m.strip() + ";")
        skipped = ", ".join(re.search(r"MACRO\s+(\w+)", m).group(1) for m in python) or "none"
        lines += ["", "-- The macros of queries/_macros.sql that plain DuckDB runs (not: " + skipped + ", which "
                  "need neurostore's Python functions).", *plain]
        return "\n".join(lines) + "\n"

    # ---- export ----------------------------------------------------------------------------

    def export(self, to: str | os.PathLike, overwrite: bool = False) -> dict:
        """Copy every committed table as plain Parquet (same Hive layout) to `to`, with load.sql and
        the schema DDL. The copy is a consistent snapshot of one manifest."""
        to = Path(to).expanduser().resolve()
        if to == self.path or self.path in to.parents:
            raise BadInput(f"Cannot export into the store itself ('{to}'). Pick a folder outside it.")
        if to.exists() and not to.is_dir():
            raise BadInput(f"Export folder '{to}' is a file. Give a folder path (it is created if missing).")
        if to.exists() and any(to.iterdir()):
            # overwrite=True replaces an earlier export's tables/, never another store's or a folder of other files
            if (to / "store.json").exists() or (to / "manifest.json").exists():
                raise BadInput(f"Export folder '{to}' is a neurostore store; an export never replaces one. "
                               "Pick an empty folder.")
            if not overwrite:
                raise BadInput(f"Export folder '{to}' is not empty. Pick an empty folder or pass overwrite=True.")
            if not (to / "load.sql").is_file():
                raise BadInput(f"Export folder '{to}' holds other files and no earlier export (no load.sql); "
                               "overwrite=True replaces only an export. Pick an empty folder.")
        man = self.manifest()
        bad = self.damaged_files(e for entries in man["tables"].values() for e in entries)
        if bad:
            raise StoreDamaged(f"Cannot export '{self.path}': {'; '.join(bad[:3])}"
                               f"{f' (and {len(bad) - 3} more)' if len(bad) > 3 else ''}. Nothing was copied. "
                               f"Run 'neurostore check --store {self.path}' (--repair drops the damaged files).")
        created = not to.exists()
        shutil.rmtree(to / "tables", ignore_errors=True)
        try:
            return self._export(man, to)
        except BaseException:
            # no partial copy left behind: remove what this export wrote
            shutil.rmtree(to if created else to / "tables", ignore_errors=True)
            raise

    def _export(self, man: dict, to: Path) -> dict:
        out_man = {"tables": {}}
        counts = {}
        n_files = 0
        for name in self.tables():
            entries = man.get("tables", {}).get(name, [])
            out_man["tables"][name] = []
            for e in entries:
                src = self.path / e["path"]
                dest = to / e["path"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                # a copy, never a hard link: an export is the user's to edit, and an edit in place
                # through a link would rewrite the store's committed file
                shutil.copy2(src, dest)
                out_man["tables"][name].append(e)
                n_files += 1
            counts[name] = sum(e.get("rows", 0) for e in entries)
        (to / "schema").mkdir(parents=True, exist_ok=True)
        for ts in self.schemas.values():
            if ts.path is not None:
                shutil.copy2(ts.path, to / "schema" / ts.path.name)
        (to / "load.sql").write_text(self._load_sql(out_man, root=""))
        return {"to": str(to), "tables": counts, "files": n_files, "rows": sum(counts.values())}
