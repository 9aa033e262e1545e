-- description: The top-k images of a unit, with where in the image it fired most.
-- partition: model, layer
-- sort: unit, rank
CREATE TABLE activations (
    unit         INTEGER,    -- channel / neuron index
    rank         INTEGER,    -- 0 = strongest image
    dataset      VARCHAR,    -- probe set id
    image_id     VARCHAR,    -- the image
    act_value    FLOAT,      -- the unit's max activation over the image's spatial map
    act_mean     FLOAT,      -- the unit's mean activation over the image's spatial map
    loc_y        INTEGER,    -- row of the max in the activation grid
    loc_x        INTEGER,    -- column of the max in the activation grid
    act_map      TINYINT[][], -- the unit's map on this image as rows of cells, 0..100 = percent of the map's min..max, area-downsampled to at most 16x16 keeping the aspect (len(act_map) rows, len(act_map[1]) columns: readable and indexable in SQL, no blob to decode); NULL when maps were not kept or the layer has no spatial map (1x1)
    patch_id     VARCHAR,    -- the receptive-field patch cut for this (unit, image), see patches
    run_id       VARCHAR,    -- run that wrote the row
    model        VARCHAR,    -- model id (partition)
    layer        VARCHAR     -- module path (partition)
);
