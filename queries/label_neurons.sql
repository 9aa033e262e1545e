-- title: Concept to neurons by label, across methods
-- description: Units whose explanation label names a concept (the concept itself, or it as whole words), for every method in the store: imported ones (clip-dissect, milan, netdissect, ...) and neurostore's scorers; exact labels first.
-- param concept VARCHAR: the concept, e.g. 'dog'
-- param model VARCHAR = NULL: only this model (default: every model)
-- param method VARCHAR = NULL: only this method / scorer (default: every one)
-- param top INTEGER = 200: how many units
SELECT * FROM label_neurons($concept, model_id := $model, method_name := $method)
LIMIT $top
