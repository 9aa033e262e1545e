-- title: Ablation effects
-- description: Per-class accuracy change when units are zeroed (neurostore ablate / audit), largest drop first.
-- param model VARCHAR = NULL: only this model (default: every model)
-- param class VARCHAR = NULL: only this class (default: every class)
-- param layer VARCHAR = NULL: only ablations in this layer
SELECT model, layer, unit, units, class, value AS accuracy_change, baseline, ablated, n_images, dataset, run_id
FROM effects
WHERE kind = 'ablation' AND ($model IS NULL OR model = $model) AND ($class IS NULL OR class = $class)
  AND ($layer IS NULL OR layer = $layer)
ORDER BY value, model, class, layer, unit
