-- title: Top units of one model for a concept
-- description: Within one model, the units (any layer) that fit a concept best, with their layer depth.
-- param concept VARCHAR: the concept word or phrase
-- param model VARCHAR: model id
-- param scorer VARCHAR = NULL: only this scorer (default: every scorer)
-- param top INTEGER = 10: how many units
SELECT cu.model, cu.layer, cu.unit, cu.scorer, cu.rank, cu.score, cu.confidence, l.depth_frac
FROM concept_units cu
LEFT JOIN layers l ON l.model = cu.model AND l.layer = cu.layer
WHERE cu.concept = $concept AND cu.model = $model AND ($scorer IS NULL OR cu.scorer = $scorer)
ORDER BY cu.score DESC, cu.layer, cu.unit
LIMIT $top
