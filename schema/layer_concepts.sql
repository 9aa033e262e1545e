-- description: Per layer and scorer, how many units have each concept as their best (rank 0) concept; derived from scores.
-- partition: model
-- sort: layer, scorer, n_units DESC, concept
CREATE TABLE layer_concepts (
    layer            VARCHAR,    -- module path
    scorer           VARCHAR,    -- scorer name
    concept          VARCHAR,    -- the concept some units rank first
    n_units          BIGINT,     -- rank-0 score rows (units) of this layer and scorer whose concept this is
    mean_confidence  FLOAT,      -- mean confidence of those rank-0 rows, in [0, 1]
    run_id           VARCHAR,    -- run whose commit derived the row (the last to change the model's scores)
    model            VARCHAR     -- model id (partition)
);
