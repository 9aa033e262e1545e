-- title: Model vs model
-- description: The stored comparison of two models (neurostore compare): coverage per layer, concepts only one has, layer correspondence and matching agreement.
-- param model_a VARCHAR: one model
-- param model_b VARCHAR: the other model
-- param section VARCHAR = NULL: only one section: coverage, concept_only, concept_shared, concepts, layer_match or matching
SELECT c.model, c.other_model, c.section, c.layer, c.depth_frac, c.concept, c.metric, c.value, c.n,
       c.scorer, c.min_confidence, c.dataset, c.run_id
FROM comparisons c
WHERE ((c.model = $model_a AND c.other_model = $model_b) OR (c.model = $model_b AND c.other_model = $model_a))
  AND ($section IS NULL OR c.section = $section)
ORDER BY c.section, c.model = $model_b, c.depth_frac NULLS LAST, c.layer, c.concept, c.metric
