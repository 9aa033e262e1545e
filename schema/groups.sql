-- description: A group of units of one layer that fire together and push the same classes, with its explanation: the set of its members' concepts.
-- partition: model
-- sort: layer, group_id
CREATE TABLE groups (
    layer          VARCHAR,    -- module path of the layer the members belong to
    group_id       INTEGER,    -- group within the layer, 0 = largest
    units          INTEGER[],  -- member units
    n_units        INTEGER,    -- number of members
    label          VARCHAR,    -- the members' most common concept (ties: best mean confidence)
    concepts       VARCHAR[],  -- the members' concepts, most common first
    concept_units  INTEGER[],  -- how many members have each concept as their label
    coherence      FLOAT,      -- mean correlation of the members' pooled activations over the probe images
    scorer         VARCHAR,    -- scorer whose labels explain the members
    dataset        VARCHAR,    -- probe set the activations and attributions came from
    run_id         VARCHAR,    -- run that wrote the row
    model          VARCHAR     -- model id (partition)
);
