-- title: Where a concept's label appears along the depth, per method
-- description: Per model, method and layer (in depth order), how many units' labels name a concept and what share of the layer's explained units that is: where along the network each method finds it.
-- param concept VARCHAR: the concept, e.g. 'dog'
-- param model VARCHAR = NULL: only this model (default: every model)
WITH hits AS (SELECT model, layer, method, count(*) AS n_units, count(*) FILTER (WHERE exact) AS n_exact
              FROM label_neurons($concept, model_id := $model) GROUP BY ALL),
     explained AS (SELECT model, layer, scorer AS method, count(*) AS units FROM explanations
                   WHERE $model IS NULL OR model = $model GROUP BY ALL),
     l AS (SELECT model, layer, min(depth) AS depth, min(depth_frac) AS depth_frac FROM layers GROUP BY ALL)
SELECT x.model, x.method, x.layer, l.depth, l.depth_frac, coalesce(h.n_units, 0) AS n_units,
       coalesce(h.n_exact, 0) AS n_exact, x.units AS explained_units,
       round(coalesce(h.n_units, 0) / x.units, 4) AS share
FROM explained x LEFT JOIN hits h USING (model, layer, method) LEFT JOIN l USING (model, layer)
WHERE x.method IN (SELECT method FROM hits)
ORDER BY x.model, x.method, l.depth, x.layer
