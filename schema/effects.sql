-- description: Evidence that units matter for a class: contributions and ablation effects.
-- partition: model
-- sort: class, kind, layer, unit
CREATE TABLE effects (
    layer        VARCHAR,    -- module path
    unit         INTEGER,    -- unit, or NULL when the row is for a set of units
    units        INTEGER[],  -- the set of units ablated together (NULL for single-unit rows)
    class        VARCHAR,    -- output class
    kind         VARCHAR,    -- 'weight_x_act', 'grad_x_act', 'ablation'
    value        FLOAT,      -- contribution, or accuracy change (ablated - baseline) for ablation
    baseline     FLOAT,      -- accuracy before ablation (ablation rows)
    ablated      FLOAT,      -- accuracy after ablation (ablation rows)
    n_images     INTEGER,    -- images the figure was measured on
    dataset      VARCHAR,    -- probe set id
    run_id       VARCHAR,    -- run that wrote the row
    model        VARCHAR     -- model id (partition)
);
