-- description: A unit's explanation as a SET of concepts: the descriptions that together cover its top patches.
-- partition: model, layer
-- sort: unit, scorer
CREATE TABLE explanation_sets (
    unit         INTEGER,    -- channel / neuron index
    scorer       VARCHAR,    -- method whose evidence the set explains: 'patch' (the unit's top patches)
    concepts     VARCHAR[],  -- the set, in the order the greedy cover chose them
    gains        FLOAT[],    -- each concept's gain in coverage when it was added
    coverage     FLOAT,      -- mean over the top patches of the best chosen concept's probability
    n_patches    INTEGER,    -- top patches the set covers
    method       VARCHAR,    -- how the set was chosen, with its parameters
    vocabulary   VARCHAR,    -- vocabulary of the concepts
    encoder      VARCHAR,    -- encoder id of the patch and concept vectors
    run_id       VARCHAR,    -- run that wrote the row
    model        VARCHAR,    -- model id (partition)
    layer        VARCHAR     -- module path (partition)
);
