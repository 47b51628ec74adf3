-- One row per stored DICOM instance (received over STOW-RS, DIMSE C-STORE or /v1/analyze, or made
-- by Carina as a Secondary Capture result). The Part 10 file is a blob under
-- <data-dir>/dicom/<study uid>/<sop instance uid>.dcm, written (fsync + rename) before this row is
-- committed. The SOP Instance UID is the key: a re-send never makes a second instance.
CREATE TABLE IF NOT EXISTS dicom_instances (
    sop_instance_uid    TEXT PRIMARY KEY,
    sop_class_uid       TEXT NOT NULL,
    study_uid           TEXT NOT NULL,
    series_uid          TEXT NOT NULL,
    transfer_syntax     TEXT NOT NULL,
    patient_id          TEXT,
    patient_name        TEXT,
    patient_birth_date  TEXT,
    patient_sex         TEXT,
    study_date          TEXT COLLATE "C",         -- YYYYMMDD as sent
    study_time          TEXT,
    accession_number    TEXT,
    study_id            TEXT,
    study_description   TEXT,
    referring_physician TEXT,
    modality            TEXT,
    series_number       BIGINT,
    series_description  TEXT,
    body_part           TEXT,
    view_position       TEXT,
    instance_number     BIGINT,
    rows_               BIGINT,
    columns_            BIGINT,
    frames              BIGINT,
    size                BIGINT NOT NULL,
    received            TEXT COLLATE "C" NOT NULL, -- RFC 3339
    source              TEXT NOT NULL,  -- stow | dimse | api | result
    analysis_state      TEXT NOT NULL,  -- pending | done | skipped | failed
    analysis_reason     TEXT,           -- why skipped/failed, or the model routed to
    analysis_id         TEXT,           -- analyses.id when done
    result_of           TEXT            -- for Carina's own results: the analysed SOP Instance UID
);
CREATE INDEX IF NOT EXISTS dicom_instances_study ON dicom_instances (study_uid);
CREATE INDEX IF NOT EXISTS dicom_instances_series ON dicom_instances (series_uid);
CREATE INDEX IF NOT EXISTS dicom_instances_patient ON dicom_instances (patient_id);
CREATE INDEX IF NOT EXISTS dicom_instances_accession ON dicom_instances (accession_number);
CREATE INDEX IF NOT EXISTS dicom_instances_date ON dicom_instances (study_date);
CREATE INDEX IF NOT EXISTS dicom_instances_state ON dicom_instances (analysis_state);

-- Results sent to PACS destinations (C-STORE SCU or STOW-RS), one row per instance and
-- destination, with retry bookkeeping.
CREATE TABLE IF NOT EXISTS dicom_exports (
    sop_instance_uid TEXT NOT NULL,
    destination      TEXT NOT NULL,
    state            TEXT NOT NULL,     -- pending | sent | failed
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt     TEXT NOT NULL,     -- RFC 3339
    last_error       TEXT,
    updated          TEXT NOT NULL,
    PRIMARY KEY (sop_instance_uid, destination)
);
