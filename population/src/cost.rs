//! The computation cost of an individual (§3.5): `F_t * N_t * E + F_v * N_v` FLOPs, from a
//! fixed map of FLOPs per operation. A coarse estimate, as in the paper: it ignores data
//! loading, augmentation and set-up, which dominate for tiny models.
//!
//! Forward FLOPs per example, by operation (a multiply-add counts 2):
//!
//! | operation | FLOPs |
//! | --- | --- |
//! | convolution | `2 * Cin * kh * kw * Cout * Hout * Wout` + `Cout * Hout * Wout` (bias) |
//! | skip connection | one add per element of the vertex (resizing moves data only) |
//! | batch norm + ReLU | 3 per element (scale, shift, max) |
//! | fully connected | `2 * inputs * classes + classes` |
//!
//! `kh, kw` is the filter as computed: taps beyond `2 * side - 1` only ever meet padding and
//! are not evaluated (the trainer's `layers::Conv2d` computes only the centre). A training
//! example costs the forward pass plus a backward pass of about twice that (gradients with
//! respect to inputs and to weights), so `F_t = 3 * F_v`.

use serde::{Deserialize, Serialize};

use crate::dna::{Activation, Dna, EdgeKind, ModelSpec};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Flops {
    /// F_v: one example's forward pass in evaluation mode.
    pub forward_per_example: f64,
    /// F_t: one example's forward and backward pass in training.
    pub training_per_example: f64,
}

impl Flops {
    pub fn of(dna: &Dna, spec: ModelSpec) -> Self {
        let shapes = dna.shapes(spec.input);
        let mut forward = 0f64;
        for index in 1..dna.vertices.len() {
            let out = shapes[index];
            let out_elements = out.elements() as f64;
            let edge = dna.primary_edge_into(index);
            if let EdgeKind::Convolution(c) = &edge.kind {
                let input = shapes[index - 1];
                let kh = c.filter_height().min(2 * input.height - 1);
                let kw = c.filter_width().min(2 * input.width - 1);
                forward += 2.0 * (input.channels * kh * kw) as f64 * out_elements + out_elements;
            }
            forward += dna.skip_edges_into(index).count() as f64 * out_elements;
            if dna.vertices[index].activation == Activation::BatchNormRelu {
                forward += 3.0 * out_elements;
            }
        }
        let features = shapes.last().expect("valid DNA").elements() as f64;
        let classes = spec.classes as f64;
        forward += 2.0 * features * classes + classes;
        Self {
            forward_per_example: forward,
            training_per_example: 3.0 * forward,
        }
    }

    /// `F_t * N_t * E + F_v * N_v`, where `N_t * E` is the number of training examples
    /// processed (steps times batch size).
    pub fn individual(&self, training_examples: u64, validation_examples: u64) -> f64 {
        self.training_per_example * training_examples as f64
            + self.forward_per_example * validation_examples as f64
    }
}

/// The memory a training of `dna` needs, estimated before it is built, so that a child too
/// large for its device fails as an individual instead of ending its worker.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Memory {
    /// Trainable parameters (filters as computed, see the module doc).
    pub parameters: u64,
    /// Activation elements of one example's forward pass, input included.
    pub activations_per_example: u64,
}

impl Memory {
    pub fn of(dna: &Dna, spec: ModelSpec) -> Self {
        let shapes = dna.shapes(spec.input);
        let mut parameters = 0u64;
        let mut activations = spec.input.elements() as u64;
        for index in 1..dna.vertices.len() {
            let out = shapes[index];
            if let EdgeKind::Convolution(c) = &dna.primary_edge_into(index).kind {
                let input = shapes[index - 1];
                let kh = c.filter_height().min(2 * input.height - 1);
                let kw = c.filter_width().min(2 * input.width - 1);
                parameters += (input.channels * kh * kw * out.channels + out.channels) as u64;
            }
            if dna.vertices[index].activation == Activation::BatchNormRelu {
                parameters += 2 * out.channels as u64;
            }
            activations += out.elements() as u64;
        }
        let features = shapes.last().expect("valid DNA").elements() as u64;
        parameters += features * spec.classes as u64 + spec.classes as u64;
        Self {
            parameters,
            activations_per_example: activations,
        }
    }

    /// Bytes of f32 a training step at `batch` examples holds: each parameter with its
    /// gradient, momentum and the parent's copy; each activation with what backpropagation
    /// keeps of it (the value, the batch-norm intermediates and the gradient).
    pub fn training_bytes(&self, batch: usize) -> u64 {
        4 * (4 * self.parameters + 4 * self.activations_per_example * batch as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dna::{Convolution, Vertex};

    #[test]
    fn memory_of_the_linear_model() {
        let memory = Memory::of(&Dna::initial(), ModelSpec::cifar(10));
        assert_eq!(memory.parameters, 30_730);
        assert_eq!(memory.activations_per_example, 2 * 3072);
        assert_eq!(memory.training_bytes(50), 4 * (4 * 30_730 + 4 * 6144 * 50));
    }

    #[test]
    fn linear_model_by_hand() {
        let flops = Flops::of(&Dna::initial(), ModelSpec::cifar(10));
        // 3*32*32 = 3072 inputs times 10 classes, multiply-add, plus 10 bias adds.
        assert_eq!(flops.forward_per_example, 61_450.0);
        assert_eq!(flops.training_per_example, 184_350.0);
        // 10 steps of 50 and 100 validation images.
        assert_eq!(
            flops.individual(500, 100),
            184_350.0 * 500.0 + 61_450.0 * 100.0
        );
    }

    #[test]
    fn one_convolution_by_hand() {
        // in 3x32x32 -conv 3x3 stride 2, 4 channels-> BN+ReLU 4x16x16 -> FC 1024 -> 10.
        let mut dna = Dna::initial();
        dna.edges[0].kind = EdgeKind::Convolution(Convolution::new(1, 4));
        dna.vertices[1] = Vertex {
            id: dna.vertices[1].id,
            activation: Activation::BatchNormRelu,
        };
        let flops = Flops::of(&dna, ModelSpec::cifar(10));
        let conv = 2.0 * 3.0 * 9.0 * 4.0 * 256.0 + 1024.0;
        let bn_relu = 3.0 * 1024.0;
        let fc = 2.0 * 1024.0 * 10.0 + 10.0;
        assert_eq!(flops.forward_per_example, conv + bn_relu + fc);
    }

    #[test]
    fn skip_and_oversized_filter_by_hand() {
        // in 3x2x2 -conv 9x1, 1 channel-> v 1x2x2 with a skip from in. The 9-tall filter only
        // computes its central 3 rows on a 2-pixel-tall map.
        let mut dna = Dna::initial();
        dna.edges[0].kind = EdgeKind::Convolution(Convolution {
            filter_height: 9.0,
            filter_width: 1.0,
            log2_stride: 0.0,
            channels: 1.0,
        });
        let id = dna.fresh_id();
        dna.edges.push(crate::dna::Edge {
            id,
            from: dna.vertices[0].id,
            to: dna.vertices[1].id,
            role: crate::dna::Role::Skip,
            kind: EdgeKind::Identity,
        });
        let spec = ModelSpec {
            input: crate::dna::Shape3 {
                channels: 3,
                height: 2,
                width: 2,
            },
            classes: 2,
        };
        let flops = Flops::of(&dna, spec);
        let conv = 2.0 * 3.0 * 3.0 * 1.0 * 4.0 + 4.0;
        let skip = 4.0;
        let fc = 2.0 * 4.0 * 2.0 + 2.0;
        assert_eq!(flops.forward_per_example, conv + skip + fc);
    }
}
