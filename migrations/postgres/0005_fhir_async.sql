-- FHIR asynchronous request pattern (Prefer: respond-async): the request's resources are
-- stored before the 202; this row tracks what they triggered until the status endpoint can
-- return the final answer.
CREATE TABLE IF NOT EXISTS fhir_async (
    id        TEXT PRIMARY KEY,
    created   TEXT NOT NULL,
    state     TEXT NOT NULL,  -- running | done | interrupted
    status    BIGINT NOT NULL, -- HTTP status of the request's own answer (200, 201)
    location  TEXT,           -- Location of a created resource
    body      TEXT NOT NULL,  -- the request's own answer (resource or Bundle)
    reports   TEXT NOT NULL,  -- JSON array of "DiagnosticReport/<id>"
    notes     TEXT NOT NULL   -- JSON array of why there is no report
);
