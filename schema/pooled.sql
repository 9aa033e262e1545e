-- description: Pooled activations of every unit of a layer on one image: a dense matrix by rows.
-- partition: model, layer
-- sort: image_id
CREATE TABLE pooled (
    dataset      VARCHAR,    -- probe set id
    image_id     VARCHAR,    -- the image
    act_mean     FLOAT[],    -- per unit: mean over the spatial map (index = unit)
    act_max      FLOAT[],    -- per unit: max over the spatial map (index = unit)
    run_id       VARCHAR,    -- run that wrote the row
    model        VARCHAR,    -- model id (partition)
    layer        VARCHAR     -- module path (partition)
);
