-- title: Spurious-concept audit findings
-- description: Concepts unrelated to a class whose units drive it (neurostore audit), with the ablation that verifies them; headline findings first.
-- param model VARCHAR = NULL: only this model (default: every audited model)
-- param class VARCHAR = NULL: only this class (default: every class)
-- param verified BOOLEAN = false: only findings whose ablation removed the model's reliance on the cue
SELECT model, class, concept, headline, verified, rank, n_units, neurons, contribution, relatedness, threshold,
       accuracy_before, accuracy_after, cue_flip_before, cue_flip_after, reliance_drop,
       cued_accuracy_before, cued_accuracy_after, ablation, direction_layer, scorer, n_images, n_pairs, dataset, run_id
FROM audit_findings
WHERE ($model IS NULL OR model = $model) AND ($class IS NULL OR class = $class)
  AND (NOT $verified OR verified)
ORDER BY headline DESC, coalesce(verified, false) DESC, model, coalesce(reliance_drop, 0) DESC, class, rank
