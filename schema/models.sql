-- description: A target model that was dissected.
CREATE TABLE models (
    model        VARCHAR,    -- lowercase model id, e.g. 'resnet50' or 'probe-cnn'
    spec         VARCHAR,    -- how it was loaded, e.g. 'torchvision:resnet50@IMAGENET1K_V2'
    arch         VARCHAR,    -- class name of the nn.Module
    n_params     BIGINT,     -- number of parameters
    input_size   INTEGER,    -- side of the square input in pixels
    classes      VARCHAR[],  -- output class names in logit order, when known
    crop_fraction FLOAT,     -- the input is the central square of this fraction of the image's shorter
                             -- side (resize + centre crop); NULL: the whole image resized to input_size
    run_id       VARCHAR     -- run that wrote the row
);
