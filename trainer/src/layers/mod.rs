//! The network's building blocks, as the project's own types: the model builder only talks to
//! these, so a faster kernel (a fused batch norm, a cuDNN convolution) replaces one of them
//! without touching the model.

mod batch_norm;
mod conv;
pub mod cpu;
mod linear;
mod resize;

pub use batch_norm::BatchNormRelu;
pub use conv::Conv2d;
pub use linear::Linear;
pub use resize::Resize;
