-- title: Where a concept lives in each network
-- description: Per model and dissected layer (in depth order), the best score and confidence of a concept and how many units carry it: the concept's depth profile.
-- param concept VARCHAR: the concept, e.g. 'striped'
-- param scorer VARCHAR = NULL: only this scorer (default: every scorer)
-- param min_confidence DOUBLE = 0.5: a unit counts as carrying the concept from this confidence on
SELECT l.model, l.layer, l.depth, l.depth_frac,
       max(cu.confidence) AS best_confidence, max(cu.score) AS best_score,
       arg_max(cu.unit, cu.score) AS best_unit,
       count(DISTINCT cu.unit) FILTER (WHERE cu.confidence >= $min_confidence) AS n_units
FROM (SELECT model, layer, min(depth) AS depth, min(depth_frac) AS depth_frac FROM layers GROUP BY model, layer) l
LEFT JOIN concept_units cu
  ON cu.model = l.model AND cu.layer = l.layer AND cu.concept = $concept AND ($scorer IS NULL OR cu.scorer = $scorer)
WHERE l.model IN (SELECT DISTINCT model FROM concept_units WHERE concept = $concept)
GROUP BY l.model, l.layer, l.depth, l.depth_frac
ORDER BY l.model, l.depth, l.layer
