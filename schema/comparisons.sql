-- description: A figure of a model-vs-model comparison (neurostore compare): coverage per layer, concepts one model has and the other lacks, layer correspondence and matching agreement; stored from both sides.
-- partition: model
-- sort: other_model, section, layer, concept, metric
CREATE TABLE comparisons (
    other_model     VARCHAR,    -- the model compared against
    section         VARCHAR,    -- 'coverage' (per layer), 'concept_only' (concept of this model absent in the other), 'concept_shared', 'concepts', 'layer_match', 'matching'
    layer           VARCHAR,    -- module path for per-layer rows, else NULL
    depth_frac      FLOAT,      -- depth of the layer (0 = input end, 1 = output), else NULL
    concept         VARCHAR,    -- the concept for concept_only / concept_shared rows, else NULL
    metric          VARCHAR,    -- e.g. 'n_concepts', 'n_labelled', 'n_units', 'mean_corr', 'partner_agreement', 'label_agreement', 'label_agreement_chance'
    value           DOUBLE,     -- the figure
    n               INTEGER,    -- units (or pairs) the figure is over
    scorer          VARCHAR,    -- scorer whose explanations were used
    min_confidence  FLOAT,      -- explanation confidence a label needed to count (coverage and concepts)
    dataset         VARCHAR,    -- probe set id of the shared images used for matching
    run_id          VARCHAR,    -- run that wrote the row
    model           VARCHAR     -- model id of this side (partition)
);
