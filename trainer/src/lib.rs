//! The cambrian trainer: everything one evolution worker does, from an individual's DNA to
//! its trained weights and fitness.

pub mod bench;
pub mod cost;
pub mod data;
pub mod dna;
pub mod individual;
pub mod layers;
pub mod model;
pub mod mutation;
pub mod optim;
pub mod report;
pub mod seed;
pub mod store;
pub mod threads;
pub mod train;
pub mod weights;
pub mod worker;
