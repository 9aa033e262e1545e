-- description: Summary statistics of one unit's activation over all probe images.
-- partition: model, layer
-- sort: unit
CREATE TABLE units (
    unit         INTEGER,    -- channel / neuron index
    dataset      VARCHAR,    -- probe set id
    n_images     INTEGER,    -- images recorded
    act_mean     FLOAT,      -- mean of the per-image spatial max
    act_std      FLOAT,      -- standard deviation of the per-image spatial max
    act_max      FLOAT,      -- largest activation seen
    frac_active  FLOAT,      -- fraction of images whose spatial max is > 0
    q50          FLOAT,      -- median of the per-image spatial max
    q90          FLOAT,      -- 90th percentile of the per-image spatial max
    q99          FLOAT,      -- 99th percentile of the per-image spatial max
    hist_edges   FLOAT[],    -- histogram bin edges of the per-image spatial max
    hist_counts  INTEGER[],  -- histogram counts (len(hist_edges) - 1)
    run_id       VARCHAR,    -- run that wrote the row
    model        VARCHAR,    -- model id (partition)
    layer        VARCHAR     -- module path (partition)
);
