-- description: A receptive-field crop of an image, deduplicated across units, layers and models by content.
-- sort: patch_id
CREATE TABLE patches (
    patch_id     VARCHAR,    -- SHA-1 (16 hex) of the crop's size and pixels: unique, one row per crop
    dataset      VARCHAR,    -- probe set id
    image_id     VARCHAR,    -- source image
    x0           INTEGER,    -- box left, pixels (inclusive)
    y0           INTEGER,    -- box top, pixels (inclusive)
    x1           INTEGER,    -- box right, pixels (exclusive)
    y1           INTEGER,    -- box bottom, pixels (exclusive)
    thumbnail    BLOB,       -- the crop as PNG bytes (at most 96 px a side)
    run_id       VARCHAR     -- run that wrote the row
);
