-- title: Concepts per layer
-- description: Per model and layer, how many units have each concept as their best concept.
-- param model VARCHAR = NULL: only this model (default: every model)
-- param scorer VARCHAR = NULL: only this scorer (default: every scorer)
SELECT * FROM layer_concept_counts(model_id := $model, scorer_name := $scorer)
