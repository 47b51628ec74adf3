-- The durable job queue (see docs/adr/0001-job-queue-in-the-database.md). A job is inserted in
-- the same transaction as the data it works on, so accepted work is never lost. Workers claim
-- due jobs with a lease (state running, lease_owner, lease_until); an expired lease makes the
-- job claimable again. Failed attempts are retried with exponential backoff (run_at) up to
-- max_attempts, then the job is dead with the reason in last_error.
CREATE TABLE IF NOT EXISTS jobs (
    id           TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,    -- analyse | imaging-study | risk
    subject      TEXT NOT NULL,    -- what it works on: a SOP Instance UID, "ImagingStudy/<id>", ...
    payload      TEXT NOT NULL,    -- JSON
    dedupe       TEXT UNIQUE,      -- at most one job per key (NULL: no key)
    state        TEXT NOT NULL,    -- queued | running | done | dead
    attempts     INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    run_at       INTEGER NOT NULL, -- unix milliseconds: not claimed before
    lease_owner  TEXT,             -- worker holding (or last holding) the job
    lease_until  INTEGER,          -- unix milliseconds
    last_error   TEXT,
    result       TEXT,             -- JSON outcome of a finished job
    created      TEXT NOT NULL,
    updated      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (state, run_at);
CREATE INDEX IF NOT EXISTS jobs_subject ON jobs (subject);

-- analyses waiting when this version was installed become jobs
INSERT INTO jobs (id, kind, subject, payload, dedupe, state, attempts, max_attempts, run_at, created, updated)
SELECT lower(hex(randomblob(16))), 'analyse', sop_instance_uid, '{}', 'analyse:' || sop_instance_uid,
       'queued', 0, 5, 0, received, received
FROM dicom_instances WHERE analysis_state IN ('pending', 'running');
UPDATE dicom_instances SET analysis_state = 'pending' WHERE analysis_state = 'running';

-- an asynchronous FHIR request follows the jobs it enqueued
ALTER TABLE fhir_async ADD COLUMN jobs TEXT NOT NULL DEFAULT '[]';
