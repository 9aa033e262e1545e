-- description: Top units per concept, per scorer (the concept -> units direction), sorted by concept.
-- partition: model
-- sort: concept, scorer, rank
CREATE TABLE concept_units (
    concept      VARCHAR,    -- the concept
    scorer       VARCHAR,    -- scorer name
    rank         INTEGER,    -- 0 = the unit this concept fits best within the model
    layer        VARCHAR,    -- module path
    unit         INTEGER,    -- channel / neuron index
    score        FLOAT,      -- raw score
    confidence   FLOAT,      -- bounded confidence in [0, 1]
    vocabulary   VARCHAR,    -- vocabulary the concept came from
    encoder      VARCHAR,    -- encoder id (NULL for 'iou')
    run_id       VARCHAR,    -- run that wrote the row
    model        VARCHAR     -- model id (partition)
);
