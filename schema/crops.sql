-- description: A box cut from an image's content, and the patch its pixels are: a later dissect looks boxes up here instead of decoding the image to cut and hash them again.
-- sort: image_hash, x0, y0, x1, y1
CREATE TABLE crops (
    image_hash   VARCHAR,    -- SHA-1 (16 hex) of the image file's bytes: its content, never its name
    x0           INTEGER,    -- box left, pixels (inclusive)
    y0           INTEGER,    -- box top, pixels (inclusive)
    x1           INTEGER,    -- box right, pixels (exclusive)
    y1           INTEGER,    -- box bottom, pixels (exclusive)
    patch_id     VARCHAR,    -- the crop's content id (patches.patch_id)
    run_id       VARCHAR     -- run that wrote the row
);
