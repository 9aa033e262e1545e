-- description: A hooked layer of a model.
-- partition: model
CREATE TABLE layers (
    layer        VARCHAR,    -- PyTorch module path, e.g. 'layer3.1.conv2' or 'blocks.5.mlp.fc1'
    kind         VARCHAR,    -- 'conv', 'linear', 'vit_mlp', 'logits', ...
    n_units      INTEGER,    -- channels / neurons
    grid_h       INTEGER,    -- height of the spatial activation map (1 for non-spatial)
    grid_w       INTEGER,    -- width of the spatial activation map (1 for non-spatial)
    depth        INTEGER,    -- order of the layer among the model's hookable layers, from 0
    depth_frac   FLOAT,      -- depth / (number of hookable layers - 1): 0 = input end, 1 = output
    run_id       VARCHAR,    -- run that wrote the row
    model        VARCHAR     -- model id (partition)
);
