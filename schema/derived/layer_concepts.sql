-- layer_concepts derived from one model's scores: for every (layer, scorer, concept) the rank-0
-- rows whose concept it is. Every rank-0 row counts, as a GROUP BY over scores would (a NULL
-- concept is a group too). Written in layer_concept_counts' output order: DuckDB sorts presorted
-- rows about twice as fast (bench: 500k rows, 160 vs 330 ms). Filled in by
-- neurostore/store/derived.py: {scores} is a read_parquet(...) of the model's committed score
-- files, {run_id} a quoted run id or CAST(NULL AS VARCHAR); nothing else is substituted.
SELECT layer, scorer, concept, count(*) AS n_units, CAST(avg(confidence) AS FLOAT) AS mean_confidence,
       {run_id} AS run_id
FROM {scores}
WHERE rank = 0
GROUP BY layer, scorer, concept
ORDER BY layer, scorer, n_units DESC, concept
