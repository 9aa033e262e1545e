-- description: An edge of the group circuit: a group's attribution to a group of the next dissected layer (kind 'group') or to a class logit (kind 'class').
-- partition: model
-- sort: kind, dst_layer, dst_group, class
CREATE TABLE group_edges (
    kind           VARCHAR,    -- 'group' (group -> group of the next layer) or 'class' (group -> class logit)
    src_layer      VARCHAR,    -- upstream layer
    src_group      INTEGER,    -- upstream group
    dst_layer      VARCHAR,    -- downstream layer (NULL for class edges)
    dst_group      INTEGER,    -- downstream group (NULL for class edges)
    class          VARCHAR,    -- the class (NULL for group edges)
    weight         FLOAT,      -- the block sum of the members' unit_edges weights: mean over images of gradient x activation summed over the source's members toward the downstream group's summed mean activation; class edges: the members' gradient x activation toward the class logit on the class's images
    n_images       INTEGER,    -- images the attribution was averaged over
    dataset        VARCHAR,    -- probe set id
    run_id         VARCHAR,    -- run that wrote the row
    model          VARCHAR     -- model id (partition)
);
