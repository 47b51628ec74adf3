-- The feature vector of each patient's latest risk assessment: a new assessment is made only
-- when the vector changes.
CREATE TABLE IF NOT EXISTS risk_state (
    patient   TEXT PRIMARY KEY, -- "Patient/<id>"
    features  TEXT NOT NULL,    -- JSON of the values and the model name
    updated   TEXT NOT NULL
);
