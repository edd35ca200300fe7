//! The `EvolutionExperiment` custom resource (group `cambrian.dev`, version `v1alpha1`): the
//! spec a user writes, the status the operator reports, and the one validation every entry
//! point applies.

pub mod manifest;
pub mod parse;
pub mod spec;
pub mod status;
pub mod validate;

pub use manifest::Experiment;
pub use parse::{parse_duration, parse_store_url, DurationError, StoreLocation, StoreUrlError};
pub use spec::*;
pub use status::*;
pub use validate::{validate, SpecError, ValidatedSpec};

#[cfg(test)]
mod tests;
