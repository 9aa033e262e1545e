-- title: Runs
-- description: Recent runs with their command, status, rows written and time taken, newest first.
-- param command VARCHAR = NULL: only runs of this command, e.g. 'dissect'
-- param status VARCHAR = NULL: only runs with this status: 'committed' or 'failed'
-- param limit INTEGER = 20: how many runs
SELECT run_id, command, status, started_at,
       round(epoch(ended_at) - epoch(started_at), 2) AS seconds,
       tables AS rows_written, params, git_rev, error
FROM runs
WHERE ($command IS NULL OR command = $command) AND ($status IS NULL OR status = $status)
ORDER BY started_at DESC, run_id DESC
LIMIT $limit
