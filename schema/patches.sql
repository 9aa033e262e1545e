-- description: A receptive-field crop of an image, deduplicated across units.
-- sort: patch_id
CREATE TABLE patches (
    patch_id     VARCHAR,    -- hash of dataset, image and box
    dataset      VARCHAR,    -- probe set id
    image_id     VARCHAR,    -- source image
    x0           INTEGER,    -- box left, pixels (inclusive)
    y0           INTEGER,    -- box top, pixels (inclusive)
    x1           INTEGER,    -- box right, pixels (exclusive)
    y1           INTEGER,    -- box bottom, pixels (exclusive)
    thumbnail    BLOB,       -- the crop as PNG bytes (at most 96 px a side)
    run_id       VARCHAR     -- run that wrote the row
);
