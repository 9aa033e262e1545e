-- title: Units where two methods disagree most
-- description: For one model and two explanation methods, the units whose two labels are least alike (lowest MiniLM similarity), with both labels: where to look first when methods contradict each other.
-- param model VARCHAR: the model, e.g. 'resnet50'
-- param method_a VARCHAR: a method / scorer, e.g. 'clip-dissect'
-- param method_b VARCHAR: another, e.g. 'milan'
-- param layer VARCHAR = NULL: only this layer (default: every layer both explain)
-- param top INTEGER = 20: how many units
SELECT a.layer, a.unit, a.label AS label_a, b.label AS label_b, text_similarity(a.label, b.label) AS similarity
FROM explanations a JOIN explanations b ON a.model = b.model AND a.layer = b.layer AND a.unit = b.unit
WHERE a.model = $model AND a.scorer = $method_a AND b.scorer = $method_b AND ($layer IS NULL OR a.layer = $layer)
ORDER BY similarity, a.layer, a.unit
LIMIT $top
