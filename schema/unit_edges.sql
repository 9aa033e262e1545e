-- description: An attribution edge of one unit: to a unit of the next dissected layer (kind 'unit') or to a class logit (kind 'class'); only each unit's strongest edges are kept (neurostore groups).
-- partition: model
-- sort: kind, src_layer, src_unit, dst_layer, dst_unit
CREATE TABLE unit_edges (
    kind           VARCHAR,    -- 'unit' (unit -> unit of the next dissected layer) or 'class' (unit -> class logit)
    src_layer      VARCHAR,    -- upstream layer
    src_unit       INTEGER,    -- upstream unit
    dst_layer      VARCHAR,    -- downstream layer (NULL for class edges)
    dst_unit       INTEGER,    -- downstream unit (NULL for class edges)
    class          VARCHAR,    -- the class (NULL for unit edges)
    weight         FLOAT,      -- mean over images of gradient x activation of the source unit, summed over positions, toward the downstream unit's mean activation; class edges: toward the class logit on the class's images; signed
    n_images       INTEGER,    -- images the attribution was averaged over
    dataset        VARCHAR,    -- probe set id
    run_id         VARCHAR,    -- run that wrote the row
    model          VARCHAR     -- model id (partition)
);
