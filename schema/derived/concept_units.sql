-- concept_units derived from one model's scores: for every (concept, scorer) the best {top} units
-- across the model's layers, in the table's file-column order (concept_units keeps each score's
-- own run_id). Filled in by neurostore/store/derived.py: {scores} is a read_parquet(...) of the
-- model's committed score files, {top} a whole number; nothing else is substituted.
SELECT concept, scorer, unit_rank AS rank, layer, unit, score, confidence, vocabulary, encoder, run_id
FROM (
    SELECT concept, scorer,
           CAST(row_number() OVER w - 1 AS INTEGER) AS unit_rank,
           layer, unit, score, confidence, vocabulary, encoder, run_id
    FROM {scores}
    WHERE concept IS NOT NULL AND score IS NOT NULL
    WINDOW w AS (PARTITION BY concept, scorer ORDER BY score DESC, layer, unit)
    -- the window by name: 'rank' is also a column of scores (a concept's rank in its unit)
    QUALIFY row_number() OVER w <= {top}
) ORDER BY concept, scorer, unit_rank
