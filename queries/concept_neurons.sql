-- title: Concept to neurons
-- description: Units whose top concepts include a concept, across models and layers: units whose headline it is first, then by confidence (the calibrated chance the label is right: comparable across scorers; raw scores are not).
-- param concept VARCHAR: the concept word or phrase, e.g. 'striped'
-- param top INTEGER = 50: how many units
-- param scorer VARCHAR = NULL: only this scorer, e.g. 'patch' (default: every scorer)
SELECT * FROM concept_neurons($concept, top_n := $top, scorer_name := $scorer)
