-- description: Top concepts per unit, per scorer (the unit -> concepts direction).
-- partition: model, layer
-- sort: unit, scorer, rank
CREATE TABLE scores (
    unit         INTEGER,    -- channel / neuron index
    scorer       VARCHAR,    -- 'patch', 'soft_wpmi', 'wpmi', 'cos_cubed', 'iou'
    rank         INTEGER,    -- 0 = best concept for this unit and scorer
    concept      VARCHAR,    -- the concept
    score        FLOAT,      -- raw score on the scorer's own scale
    confidence   FLOAT,      -- calibrated chance in [0, 1] that the label is right (neurostore.trust)
    vocabulary   VARCHAR,    -- vocabulary the concept came from
    encoder      VARCHAR,    -- encoder id used for similarities (NULL for 'iou')
    run_id       VARCHAR,    -- run that wrote the row
    model        VARCHAR,    -- model id (partition)
    layer        VARCHAR     -- module path (partition)
);
