-- title: Concepts one model has that another lacks
-- description: Concepts that are the best concept of some unit in model A but of no unit in model B.
-- param model_a VARCHAR: the model that has the concepts
-- param model_b VARCHAR: the model compared against
-- param scorer VARCHAR = NULL: only this scorer (default: every scorer)
WITH top AS (
    SELECT model, concept, count(*) AS n_units
    FROM scores
    WHERE rank = 0 AND model IN ($model_a, $model_b) AND ($scorer IS NULL OR scorer = $scorer)
    GROUP BY model, concept
)
SELECT a.concept, a.n_units AS units_in_a
FROM top a
WHERE a.model = $model_a
  AND NOT EXISTS (SELECT 1 FROM top b WHERE b.model = $model_b AND b.concept = a.concept)
ORDER BY a.n_units DESC, a.concept
