"""The store: a folder of Parquet files, a manifest that says which files are committed, and
DuckDB views over them. See docs/store.md for the layout and the commit protocol.

    store = Store.open("neurostore-store")
    with store.run("dissect", params={"model": "resnet50"}) as run:
        run.write("scores", arrow_or_pandas)     # validated against schema/, run_id filled in
    store.sql("SELECT * FROM scores WHERE unit = $u", {"u": 7})   # -> pyarrow.Table

Only this package writes files into a store. Its modules, lowest first: files (names, atomic
writes, hashes, footers, locks), derived (tables derived from scores), commit (manifest, runs,
commit), views (reading), maintenance (gc, check, repair), export, core (the Store class).
"""

from .commit import Run
from .core import Store, check
from .derived import DERIVED_TABLES
from .files import _atomic_write  # pipeline.py: encoder_iou's window index beside a checkpoint
from .files import _staging_is_dead  # world/build.py: a dead build folder is told by the same lock

# `ns.open(path)`: the same call as Store.open.
open = Store.open

__all__ = ["DERIVED_TABLES", "Run", "Store", "check", "open", "_atomic_write", "_staging_is_dead"]
