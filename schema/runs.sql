-- description: One row per run: every write to the store belongs to exactly one run.
-- sort: started_at
CREATE TABLE runs (
    run_id      VARCHAR,    -- unique id: UTC start time plus random suffix
    command     VARCHAR,    -- what ran, e.g. 'dissect' or 'world build'
    params      JSON,       -- the run's parameters as a JSON object
    work_key    VARCHAR,    -- hash of command and params: a re-run with the same key replaces
    versions    JSON,       -- package versions (neurostore, torch, duckdb, ...) as a JSON object
    git_rev     VARCHAR,    -- git revision of neurostore when run from a checkout, else NULL
    host        VARCHAR,    -- machine name
    started_at  TIMESTAMP,  -- UTC start
    ended_at    TIMESTAMP,  -- UTC end
    status      VARCHAR,    -- 'committed' or 'failed' (a killed run leaves no row)
    error       VARCHAR,    -- the exception message of a failed run
    tables      JSON        -- rows written per table, as a JSON object
);
