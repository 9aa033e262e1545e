-- title: Matched units across two models
-- description: One-to-one unit matches between two models (neurostore compare), by activation correlation or explanation similarity, seen from model's side.
-- param model VARCHAR: the model whose units are listed
-- param other_model VARCHAR: the model they are matched into
-- param method VARCHAR = 'activation': 'activation' or 'explanation'
-- param layer VARCHAR = NULL: only units of this layer of `model`
-- param top INTEGER = 100: how many pairs, best score first
SELECT model, layer, unit, other_model, other_layer, other_unit, method, score, corr, label, other_label,
       label_similarity, agree, depth_frac, other_depth_frac, n_images, dataset, scorer, run_id
FROM unit_matches
WHERE model = $model AND other_model = $other_model AND method = $method AND ($layer IS NULL OR layer = $layer)
ORDER BY score DESC, layer, unit
LIMIT $top
