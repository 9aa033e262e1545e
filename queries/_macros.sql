-- Macros for the core questions, created on every store connection (neurostore.sqlfuncs).
-- This file is not a named query (its name starts with '_'). Macro parameters are named so they
-- never shadow a column (concept_name, not concept), and the macros' own table aliases end in '_':
-- DuckDB substitutes an argument as an expression, so a caller's `c.concept` would otherwise name
-- the macro's own `c`.

-- Concept -> the units that fit it best, across every model and layer. Reads concept_units (the
-- store keeps the top units per model, concept and scorer there, sorted by concept). THE concept
-- search: named queries, neurostore.find and the web app's search all call it. top_n := NULL is
-- every unit; model_ids / layer_names (lists) narrow it. Several concepts at once, top_n each:
--   SELECT n.* FROM unnest(['dog', 'cat']) AS c(name), concept_neurons(c.name, top_n := 5) n
CREATE OR REPLACE MACRO concept_neurons(concept_name, top_n := 50, scorer_name := NULL, model_ids := NULL,
                                        layer_names := NULL) AS TABLE
    WITH hits AS (
        SELECT cu_.model, cu_.layer, cu_.unit, cu_.concept, cu_.scorer, cu_.score, cu_.confidence, cu_.rank AS rank_in_model,
               EXISTS (SELECT 1 FROM headlines hl_ WHERE hl_.model = cu_.model AND hl_.layer = cu_.layer
                       AND hl_.unit = cu_.unit AND hl_.concept = cu_.concept AND hl_.vocabulary = cu_.vocabulary) AS headline,
               cu_.vocabulary, cu_.encoder, cu_.run_id
        FROM concept_units cu_
        WHERE cu_.concept = concept_name AND (scorer_name IS NULL OR cu_.scorer = scorer_name)
          AND (model_ids IS NULL OR list_contains(model_ids, cu_.model))
          AND (layer_names IS NULL OR list_contains(layer_names, cu_.layer)))
    -- Units whose headline (one answer per unit, neurostore.trust) is the concept lead; then the
    -- confidence (neurostore.trust: the calibrated chance the label is right), which means the
    -- same for every scorer (raw scores do not: soft_wpmi is unbounded). `rank` is the row's place in this answer (0 first), to order joined answers by.
    SELECT *, row_number() OVER (ORDER BY headline DESC, confidence DESC, score DESC, model, layer, unit) - 1 AS rank
    FROM hits
    ORDER BY rank
    LIMIT top_n;

-- Models dissected with untrained (random) weights (their dissect's params say so): their units
-- explain nothing, so their rows are a baseline to compare with, not findings. find, the web
-- pages and the report say so beside them.
CREATE OR REPLACE MACRO untrained_models() AS TABLE
    SELECT DISTINCT um_.model
    FROM models um_ JOIN runs ur_ USING (run_id)
    WHERE coalesce(json_extract(ur_.params, '$.random_weights.target')::BOOLEAN, false)
    ORDER BY um_.model;

-- Neuron -> its ranked concepts, per scorer, and imported methods' labels of it.
CREATE OR REPLACE MACRO neuron_concepts(model_id, layer_name, unit_index, scorer_name := NULL) AS TABLE
    SELECT model, layer, unit, scorer, rank, concept, score, confidence, vocabulary, encoder, run_id
    FROM scores
    WHERE model = model_id AND layer = layer_name AND unit = unit_index
      AND (scorer_name IS NULL OR scorer = scorer_name)
    UNION ALL   -- imported methods' labels (field results): the method as the scorer, no calibrated confidence
    SELECT nc_.model, nc_.layer, nc_.unit, nc_.method, nc_.rank, nc_.label, nc_.score, NULL, ne_.vocabulary, NULL,
           nc_.run_id
    FROM explanation_candidates nc_
    LEFT JOIN explanations ne_ ON ne_.model = nc_.model AND ne_.layer = nc_.layer AND ne_.unit = nc_.unit
                              AND ne_.scorer = nc_.method
    WHERE nc_.model = model_id AND nc_.layer = layer_name AND nc_.unit = unit_index
      AND (scorer_name IS NULL OR nc_.method = scorer_name)
    ORDER BY scorer, rank;

-- Per layer: how many units have each concept as their best (rank 0) concept. Reads layer_concepts
-- (the store counts rank-0 score rows per model, layer, scorer and concept there at commit), not scores.
CREATE OR REPLACE MACRO layer_concept_counts(model_id := NULL, scorer_name := NULL) AS TABLE
    SELECT model, layer, scorer, concept, n_units
    FROM layer_concepts
    WHERE (model_id IS NULL OR model = model_id) AND (scorer_name IS NULL OR scorer = scorer_name)
    ORDER BY model, layer, scorer, n_units DESC, concept;

-- Free text -> the nearest stored concepts by MiniLM cosine similarity (store.embed_concepts()
-- stores the concept vectors; text_embedding() embeds the phrase, once per phrase and process).
CREATE OR REPLACE MACRO similar_concepts(phrase, k := 10) AS TABLE
    SELECT item_id AS concept,
           max(array_cosine_similarity(CAST(vector AS FLOAT[384]), text_embedding(phrase))) AS similarity
    FROM embeddings
    WHERE kind = 'concept' AND encoder = 'minilm:all-MiniLM-L6-v2'
    GROUP BY item_id
    ORDER BY similarity DESC, concept
    LIMIT k;

-- Concept -> units whose explanation label names it, across every method: imported ones
-- ('clip-dissect', 'milan', 'netdissect', ...) and neurostore's scorers. A label names the concept
-- when it is the concept or holds it as whole words (plural 's'/'es' too): 'dog' finds 'dog',
-- 'dogs' faces' and 'hot dog', not 'dogwood'. `exact` marks labels that are the concept.
CREATE OR REPLACE MACRO label_neurons(concept_name, model_id := NULL, method_name := NULL) AS TABLE
    WITH lw_ AS (SELECT trim(array_to_string(string_split_regex(lower(concept_name), '[^a-z0-9]+'), ' ')) AS words),
         ld_ AS (SELECT model, layer, min(depth) AS depth, min(depth_frac) AS depth_frac FROM layers GROUP BY ALL)
    SELECT le_.model, le_.layer, ld_.depth, ld_.depth_frac, le_.unit, le_.scorer AS method, le_.label,
           le_.label = lw_.words OR lower(le_.label) = lower(concept_name) AS exact
    FROM explanations le_ CROSS JOIN lw_ LEFT JOIN ld_ ON ld_.model = le_.model AND ld_.layer = le_.layer
    WHERE (model_id IS NULL OR le_.model = model_id) AND (method_name IS NULL OR le_.scorer = method_name)
      AND lw_.words <> ''
      AND (SELECT bool_or(contains(' ' || array_to_string(string_split_regex(lower(le_.label), '[^a-z0-9]+'), ' ') || ' ',
                                   ' ' || lw_.words || suffix || ' '))
           FROM (VALUES (''), ('s'), ('es')) AS sv_(suffix))
    ORDER BY exact DESC, le_.model, ld_.depth, le_.layer, le_.unit, method;
