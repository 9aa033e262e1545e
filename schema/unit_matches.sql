-- description: A unit of one model matched one-to-one to a unit of another (neurostore compare), by activation correlation or by explanation similarity; every pair is stored from both sides.
-- partition: model
-- sort: other_model, method, layer, unit
CREATE TABLE unit_matches (
    layer             VARCHAR,    -- module path of this unit
    unit              INTEGER,    -- channel / neuron index of this unit
    depth_frac        FLOAT,      -- depth of this unit's layer in its model (0 = input end, 1 = output)
    other_model       VARCHAR,    -- the model compared against
    other_layer       VARCHAR,    -- module path of the matched unit
    other_unit        INTEGER,    -- channel / neuron index of the matched unit
    other_depth_frac  FLOAT,      -- depth of the matched unit's layer in the other model
    method            VARCHAR,    -- 'activation' (one-to-one assignment on correlation) or 'explanation' (on label similarity)
    score             FLOAT,      -- what the assignment maximised: Pearson correlation, or MiniLM cosine of the explanations
    corr              FLOAT,      -- Pearson correlation of the two units' pooled act_mean over the shared images
    label             VARCHAR,    -- this unit's explanation label for `scorer`
    other_label       VARCHAR,    -- the matched unit's explanation label
    label_similarity  FLOAT,      -- MiniLM cosine of the two labels (1 = identical)
    agree             BOOLEAN,    -- the other method matched this unit to the same partner (NULL when it matched it to none)
    n_images          INTEGER,    -- shared probe images the correlation is over
    dataset           VARCHAR,    -- probe set id of the shared images
    scorer            VARCHAR,    -- scorer whose explanations were used
    run_id            VARCHAR,    -- run that wrote the row
    model             VARCHAR     -- model id of this unit (partition)
);
