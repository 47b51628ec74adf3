-- Carina: the lab-result risk model (models/icu-mortality-risk) as an InterSystems IRIS IntegratedML model.
-- Same feature contract as the local ONNX model: Age (years), Ldh (U/L, LOINC 2532-0),
-- LymphocytesPct (%, LOINC 736-9), HsCrp (mg/L, LOINC 30522-7); outcome OutcomeDeath = in-hospital death
-- (1 = died). Not ICU admission: see models/icu-mortality-risk/MODEL_CARD.md.
-- Untested here (no IRIS instance was available when this was written); see README.md.

CREATE TABLE Carina.IcuTrainingRows (
    PatientId      VARCHAR(32) NOT NULL,
    Age            DOUBLE,
    Ldh            DOUBLE,
    LymphocytesPct DOUBLE,
    HsCrp          DOUBLE,
    OutcomeDeath   INTEGER NOT NULL
);

-- Load the 300 training rows (icu_training_rows.csv, written by training/train_icu.py: plausibility
-- filter + median imputation already applied, exactly what the local model was fitted on).
-- Copy the CSV into the container first, e.g. docker cp icu_training_rows.csv iris:/tmp/
-- (or run load_training_rows.py, which INSERTs the same rows over DB-API).
LOAD DATA FROM FILE '/tmp/icu_training_rows.csv'
    INTO Carina.IcuTrainingRows (PatientId, Age, Ldh, LymphocytesPct, HsCrp, OutcomeDeath)
    USING {"from": {"file": {"header": true}}};

-- Feature view without the identifier, so PatientId is not used as a feature.
CREATE VIEW Carina.IcuTrainingFeatures AS
    SELECT Age, Ldh, LymphocytesPct, HsCrp, OutcomeDeath FROM Carina.IcuTrainingRows;

CREATE MODEL IcuDeathRisk PREDICTING (OutcomeDeath) FROM Carina.IcuTrainingFeatures;

TRAIN MODEL IcuDeathRisk;

-- In-sample validation (the local model's cross-validated figures are in its MODEL_CARD.md).
VALIDATE MODEL IcuDeathRisk FROM Carina.IcuTrainingFeatures;
SELECT * FROM INFORMATION_SCHEMA.ML_VALIDATION_METRICS WHERE MODEL_NAME = 'IcuDeathRisk';
SELECT * FROM INFORMATION_SCHEMA.ML_TRAINED_MODELS WHERE MODEL_NAME = 'IcuDeathRisk';

-- Scoring: PREDICT gives the class (0/1), PROBABILITY(... FOR 1) the probability of death.
-- Risk bands as in the manifest: low < 0.2 <= moderate < 0.5 <= high.
SELECT TOP 10 PatientId,
       PREDICT(IcuDeathRisk) AS PredictedDeath,
       PROBABILITY(IcuDeathRisk FOR 1) AS ProbabilityDeath,
       OutcomeDeath
FROM Carina.IcuTrainingRows;

-- Score a new patient (values in the contract units):
SELECT PROBABILITY(IcuDeathRisk FOR 1) AS ProbabilityDeath
FROM (SELECT 75 AS Age, 700.0 AS Ldh, 4.0 AS LymphocytesPct, 150.0 AS HsCrp) AS NewPatient;
