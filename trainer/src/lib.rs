//! The cambrian trainer: everything one evolution worker does with a DNA that needs a
//! deep-learning stack, from building its network to its trained weights and fitness, and the
//! worker loop that drives it. What decides which DNA to train, and the store it is recorded
//! in, is the `population` crate.

pub mod bench;
pub mod child;
pub mod data;
pub mod device;
pub mod export;
pub mod layers;
pub mod model;
pub mod onnx;
pub mod optim;
pub mod pictures;
pub mod report;
pub mod study;
pub mod threads;
pub mod train;
pub mod weights;
pub mod worker;
