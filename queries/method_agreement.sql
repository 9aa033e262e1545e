-- title: How often two methods agree, per layer
-- description: For one model and two explanation methods (e.g. clip-dissect and netdissect), per layer in depth order: units both explain, how many get the same label, that share, and the mean MiniLM similarity of their two labels.
-- param model VARCHAR: the model, e.g. 'resnet50'
-- param method_a VARCHAR: a method / scorer, e.g. 'clip-dissect'
-- param method_b VARCHAR: another, e.g. 'netdissect'
WITH l AS (SELECT model, layer, min(depth) AS depth, min(depth_frac) AS depth_frac FROM layers GROUP BY ALL)
SELECT a.layer, any_value(l.depth_frac) AS depth_frac, count(*) AS units,
       count(*) FILTER (WHERE a.label = b.label) AS same_label,
       round(count(*) FILTER (WHERE a.label = b.label) / count(*), 4) AS agreement,
       round(avg(text_similarity(a.label, b.label)), 4) AS mean_similarity
FROM explanations a JOIN explanations b ON a.model = b.model AND a.layer = b.layer AND a.unit = b.unit
LEFT JOIN l ON l.model = a.model AND l.layer = a.layer
WHERE a.model = $model AND a.scorer = $method_a AND b.scorer = $method_b
GROUP BY a.layer
ORDER BY any_value(l.depth), a.layer
