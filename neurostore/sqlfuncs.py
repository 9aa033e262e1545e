"""Everything a store connection gets besides its views: semantic text UDFs and the SQL macros.

`prepare_connection(con)` is the one function that prepares every connection (STYLE: UDFs are
registered in one place). The UDFs use the offline MiniLM (`neurostore.textembed`), loaded
lazily on the first call of a semantic function, so plain SQL never pays its load time.

SQL functions:
    text_embedding(phrase)  -> FLOAT[384]   MiniLM embedding (unit length)
    text_similarity(a, b)   -> DOUBLE       cosine similarity of two phrases
    similar_concepts(phrase, k := 10)       table macro: nearest stored concept embeddings
plus the macros in queries/_macros.sql (concept_neurons, neuron_concepts, layer_concept_counts, ...).

`embed_concepts(store, ...)` writes the concept vectors similar_concepts() searches.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import duckdb
import numpy as np
import pyarrow as pa

from .errors import UnknownVocabulary, unknown
from .resources import sql_dir
from .schema import vector_column
from .textembed import MINILM_DIM, MINILM_ID, embed_texts  # noqa: F401  (MINILM_ID: callers import it from here)

MACROS_FILE = sql_dir("queries") / "_macros.sql"


def _strings(arr) -> list:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.to_pylist()


def _udf_text_embedding(phrases) -> pa.Array:
    vals = _strings(phrases)
    present = [v for v in vals if v is not None]
    vecs = embed_texts(present)
    flat = np.zeros((len(vals), MINILM_DIM), np.float32)
    mask = np.array([v is None for v in vals], bool)
    flat[~mask] = vecs
    return vector_column(flat, mask if mask.any() else None)


def _udf_text_similarity(a, b) -> pa.Array:
    va, vb = _strings(a), _strings(b)
    ok = [x is not None and y is not None for x, y in zip(va, vb)]
    xs = [x for x, k in zip(va, ok) if k]
    ys = [y for y, k in zip(vb, ok) if k]
    sims = np.einsum("ij,ij->i", embed_texts(xs), embed_texts(ys)) if xs else np.zeros(0)
    out, it = [], iter(sims.tolist())
    for k in ok:
        out.append(next(it) if k else None)
    return pa.array(out, pa.float64())


PYTHON_UDFS = ("text_embedding", "text_similarity")   # registered by prepare_connection: not in plain DuckDB


def macro_statements(path: Path = MACROS_FILE) -> list[str]:
    """The CREATE MACRO statements of queries/_macros.sql."""
    return [s.query for s in duckdb.extract_statements(path.read_text())]


def prepare_connection(con: duckdb.DuckDBPyConnection, macros: bool = True) -> duckdb.DuckDBPyConnection:
    """Register the semantic UDFs and (when the store views exist) the macros on `con`."""
    varchar = duckdb.sqltype("VARCHAR")
    con.create_function("text_embedding", _udf_text_embedding, [varchar], duckdb.sqltype(f"FLOAT[{MINILM_DIM}]"),
                        type="arrow", null_handling="special", side_effects=False)
    con.create_function("text_similarity", _udf_text_similarity, [varchar, varchar], duckdb.sqltype("DOUBLE"),
                        type="arrow", null_handling="special", side_effects=False)
    if macros:
        for stmt in macro_statements():
            con.execute(stmt)
    return con


def embed_concepts(store, vocabulary: str | None = None, concepts: Iterable[str] | None = None) -> dict:
    """Embed concepts with MiniLM and store them in `store`'s `embeddings` (kind='concept'), so
    SQL's similar_concepts(phrase, k) can find them. Takes the concepts of `vocabulary` from the
    concepts table (all vocabularies when None), or an explicit list. One run; returns its summary."""
    if concepts is None:
        where, p = ("WHERE vocabulary = $v", {"v": vocabulary}) if vocabulary else ("", None)
        got = store.sql(f"SELECT DISTINCT concept FROM concepts {where} ORDER BY concept", p)
        concepts = [c for c in got.column("concept").to_pylist() if c]
        if not concepts:
            have = store.sql("SELECT DISTINCT vocabulary FROM concepts").column("vocabulary").to_pylist()
            raise UnknownVocabulary(unknown("vocabulary", vocabulary or "(any)", [v for v in have if v],
                                            "Write its concepts to the concepts table first."))
    concepts = sorted(dict.fromkeys(concepts))
    vecs = embed_texts(concepts)  # [n, 384]
    table = pa.table({"encoder": [MINILM_ID] * len(concepts), "kind": ["concept"] * len(concepts),
                      "item_id": concepts, "vector": vector_column(vecs)})
    # keyed by the vocabulary, or by the exact list: re-embedding the same concepts replaces them
    params = {"vocabulary": vocabulary, "encoder": MINILM_ID} if vocabulary \
        else {"concepts": hashlib.sha256("\n".join(concepts).encode()).hexdigest()[:16], "encoder": MINILM_ID}
    with store.run("embed concepts", params) as run:
        run.write("embeddings", table)
    return {"concepts": len(concepts), "encoder": MINILM_ID, "run_id": run.run_id}
