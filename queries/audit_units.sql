-- title: Units that drive a class
-- description: Per class, the units with the largest gradient x activation toward it (neurostore audit), their explanation, relatedness to the class and ablation effect.
-- param model VARCHAR = NULL: only this model (default: every audited model)
-- param class VARCHAR = NULL: only this class (default: every class)
-- param flagged BOOLEAN = false: only flagged units (label unrelated to the class, selective for it, tied to the cue where measured)
SELECT model, class, rank, layer, unit, grad_x_act, weight_x_act, share, ablation_effect, label, label_confidence,
       relatedness, threshold, selectivity, cue_effect, flagged, scorer, n_images, dataset, run_id
FROM audit_units
WHERE ($model IS NULL OR model = $model) AND ($class IS NULL OR class = $class) AND (NOT $flagged OR flagged)
ORDER BY model, class, rank
