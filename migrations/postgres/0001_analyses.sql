-- One row per finished image analysis. The FHIR bundle, overlay and input PNGs are blobs under
-- <data-dir>/results/<id>/ and are written (fsync + rename) before this row is committed.
CREATE TABLE IF NOT EXISTS analyses (
    id            TEXT PRIMARY KEY,
    created       TEXT NOT NULL,
    model         TEXT NOT NULL,
    model_version TEXT NOT NULL,
    label         TEXT NOT NULL,
    display       TEXT NOT NULL,
    probabilities TEXT NOT NULL, -- JSON object label -> probability
    cam_method    TEXT NOT NULL,
    source        TEXT NOT NULL  -- api | legacy
);
CREATE INDEX IF NOT EXISTS analyses_created ON analyses (created);
