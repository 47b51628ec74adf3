-- Search is driven by the index (ids from fhir_index, then their resource rows): look ids up by
-- value with the id in the index itself (no table row per match), date ranges by their end too
-- (`ge`/`gt`/`sa` compare value_hi), and a resource's current version with its sort key
-- without reading the row (the body) until the page is cut; and a candidate's own index rows
-- (the other parameters of a search are checked on each candidate of the first).
DROP INDEX IF EXISTS fhir_index_lookup;
DROP INDEX IF EXISTS fhir_index_resource;
CREATE INDEX IF NOT EXISTS fhir_index_by_resource ON fhir_index (resource_type, id, param, value, system, value_hi);
CREATE INDEX IF NOT EXISTS fhir_index_value ON fhir_index (resource_type, param, value, system, id);
CREATE INDEX IF NOT EXISTS fhir_index_value_hi ON fhir_index (resource_type, param, value_hi, value, id);
CREATE INDEX IF NOT EXISTS fhir_resources_by_id ON fhir_resources (resource_type, id, is_current, last_updated, version_id);
