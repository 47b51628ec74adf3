//! FHIR R4 as data, below the store: the resource types, the search parameters each type
//! supports and the index rows extracted from a resource when it is stored, and how references,
//! dates and instants are normalised. The store indexes with it; the FHIR server ([`crate::fhir`])
//! validates and searches with it (and re-exports it as `fhir::index` and `fhir::types`).

pub mod index;
pub mod types;
