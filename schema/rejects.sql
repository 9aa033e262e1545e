-- description: An input file a run skipped, and why.
CREATE TABLE rejects (
    dataset      VARCHAR,    -- probe set id
    path         VARCHAR,    -- the file
    reason       VARCHAR,    -- why it was skipped, e.g. 'truncated JPEG', 'zero bytes'
    run_id       VARCHAR     -- run that wrote the row
);
