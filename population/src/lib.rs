//! What the operator and the workers of cambrian share, with no deep-learning dependency: an
//! individual's DNA and how it mutates (§3.2), its record, the seeds of every random choice,
//! its cost (§3.5), the population store that is the workers' only shared state (§3.1), and
//! when an experiment stops.
//!
//! The trainer turns a DNA into a trained network; everything that decides *which* DNA to
//! train, and records what came of it, lives here.

pub mod cost;
pub mod dna;
pub mod individual;
pub mod mutation;
pub mod seed;
pub mod stop;
pub mod store;

#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
