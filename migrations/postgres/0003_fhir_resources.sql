-- FHIR resources: every version of every resource, as the JSON that was accepted (with the
-- server-assigned id and meta). `is_current` marks the latest version of each (type, id).
CREATE TABLE IF NOT EXISTS fhir_resources (
    resource_type TEXT    NOT NULL,
    id            TEXT    NOT NULL,
    version_id    BIGINT NOT NULL,
    last_updated  TEXT COLLATE "C" NOT NULL, -- instant, UTC, millisecond precision: sortable as text
    is_current    BIGINT NOT NULL,
    body          TEXT    NOT NULL,
    PRIMARY KEY (resource_type, id, version_id)
);
CREATE INDEX IF NOT EXISTS fhir_resources_current
    ON fhir_resources (resource_type, is_current, last_updated);

-- Search index of the current versions (rows are replaced when a resource is updated).
CREATE TABLE IF NOT EXISTS fhir_index (
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    param         TEXT NOT NULL,
    system        TEXT,          -- token system
    value         TEXT COLLATE "C" NOT NULL, -- token code, reference "Type/id", or start of a date range
    value_hi      TEXT COLLATE "C" -- end of a date range (exclusive)
);
CREATE INDEX IF NOT EXISTS fhir_index_lookup ON fhir_index (resource_type, param, value);
CREATE INDEX IF NOT EXISTS fhir_index_resource ON fhir_index (resource_type, id);
