-- title: Circuit for a class
-- description: The neuron groups per layer that feed a class most (attribution to its logit), with their explanations and the edges from each to the next layer's groups shown. Run 'neurostore groups MODEL' first.
-- param model VARCHAR: model id, e.g. 'probe-cnn'
-- param class VARCHAR: class name, e.g. 'star'
-- param top INTEGER = 3: groups per layer
WITH to_class AS (
    SELECT src_layer AS layer, src_group AS group_id, weight,
           row_number() OVER (PARTITION BY src_layer ORDER BY weight DESC, src_group) AS rank
    FROM group_edges WHERE model = $model AND kind = 'class' AND class = $class
), shown AS (
    SELECT * FROM to_class WHERE rank <= $top
), feeds AS (
    SELECT e.src_layer AS layer, e.src_group AS group_id,
           list(struct_pack(layer := e.dst_layer, group_id := e.dst_group, weight := round(e.weight, 4))
                ORDER BY e.weight DESC) AS feeds
    FROM group_edges e JOIN shown s ON s.layer = e.dst_layer AND s.group_id = e.dst_group
    WHERE e.model = $model AND e.kind = 'group' AND e.weight > 0
    GROUP BY ALL
), depth AS (
    SELECT layer, min(depth) AS depth FROM layers WHERE model = $model GROUP BY layer
)
SELECT d.depth, s.layer, s.group_id, s.rank, round(s.weight, 4) AS weight_to_class, g.label, g.concepts,
       g.concept_units, g.n_units, g.units, f.feeds
FROM shown s
JOIN groups g ON g.model = $model AND g.layer = s.layer AND g.group_id = s.group_id
LEFT JOIN depth d ON d.layer = s.layer
LEFT JOIN feeds f ON f.layer = s.layer AND f.group_id = s.group_id
ORDER BY d.depth, s.rank
