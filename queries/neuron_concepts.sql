-- title: Neuron to concepts
-- description: The ranked concepts of one unit (model/layer/unit), per scorer, and the labels imported methods gave it (field results; no confidence).
-- param model VARCHAR: model id, e.g. 'resnet50'
-- param layer VARCHAR: module path, e.g. 'layer4.1.conv2'
-- param unit INTEGER: channel / neuron index
-- param scorer VARCHAR = NULL: only this scorer (default: every scorer)
SELECT * FROM neuron_concepts($model, $layer, $unit, scorer_name := $scorer)
