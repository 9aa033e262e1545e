-- Macros for the core questions, created on every store connection (neurostore.sqlfuncs).
-- This file is not a named query (its name starts with '_'). Macro parameters are named so they
-- never shadow a column (concept_name, not concept).

-- Concept -> the units that fit it best, across every model and layer. Reads concept_units (the
-- store keeps the top units per model, concept and scorer there, sorted by concept). THE concept
-- search: named queries, neurostore.find and the web app's search all call it. top_n := NULL is
-- every unit; model_ids / layer_names (lists) narrow it. Several concepts at once, top_n each:
--   SELECT n.* FROM unnest(['dog', 'cat']) AS c(name), concept_neurons(c.name, top_n := 5) n
CREATE OR REPLACE MACRO concept_neurons(concept_name, top_n := 50, scorer_name := NULL, model_ids := NULL,
                                        layer_names := NULL) AS TABLE
    WITH hits AS (
        SELECT c.model, c.layer, c.unit, c.concept, c.scorer, c.score, c.confidence, c.rank AS rank_in_model,
               EXISTS (SELECT 1 FROM headlines h WHERE h.model = c.model AND h.layer = c.layer
                       AND h.unit = c.unit AND h.concept = c.concept AND h.vocabulary = c.vocabulary) AS headline,
               c.vocabulary, c.encoder, c.run_id
        FROM concept_units c
        WHERE c.concept = concept_name AND (scorer_name IS NULL OR c.scorer = scorer_name)
          AND (model_ids IS NULL OR list_contains(model_ids, c.model))
          AND (layer_names IS NULL OR list_contains(layer_names, c.layer)))
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
    SELECT DISTINCT m.model
    FROM models m JOIN runs r USING (run_id)
    WHERE coalesce(json_extract(r.params, '$.random_weights.target')::BOOLEAN, false)
    ORDER BY m.model;

-- Neuron -> its ranked concepts, per scorer.
CREATE OR REPLACE MACRO neuron_concepts(model_id, layer_name, unit_index, scorer_name := NULL) AS TABLE
    SELECT model, layer, unit, scorer, rank, concept, score, confidence, vocabulary, encoder, run_id
    FROM scores
    WHERE model = model_id AND layer = layer_name AND unit = unit_index
      AND (scorer_name IS NULL OR scorer = scorer_name)
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
    WITH c AS (SELECT trim(array_to_string(string_split_regex(lower(concept_name), '[^a-z0-9]+'), ' ')) AS words),
         l AS (SELECT model, layer, min(depth) AS depth, min(depth_frac) AS depth_frac FROM layers GROUP BY ALL)
    SELECT e.model, e.layer, l.depth, l.depth_frac, e.unit, e.scorer AS method, e.label,
           e.label = c.words OR lower(e.label) = lower(concept_name) AS exact
    FROM explanations e CROSS JOIN c LEFT JOIN l ON l.model = e.model AND l.layer = e.layer
    WHERE (model_id IS NULL OR e.model = model_id) AND (method_name IS NULL OR e.scorer = method_name)
      AND c.words <> ''
      AND (SELECT bool_or(contains(' ' || array_to_string(string_split_regex(lower(e.label), '[^a-z0-9]+'), ' ') || ' ',
                                   ' ' || c.words || suffix || ' '))
           FROM (VALUES (''), ('s'), ('es')) AS v(suffix))
    ORDER BY exact DESC, e.model, l.depth, e.layer, e.unit, method;
