//! Batch norm fused with the ReLU that always follows it on a BN+ReLU vertex, on the CPU.
//!
//! Composed from Candle's tensor operations, a training batch norm makes a dozen passes over
//! its input and as many temporaries (many times slower than PyTorch). Fused, training forward
//! reads the input twice (statistics, then normalise + ReLU), backward twice (sums, then the
//! input gradient), with channels in parallel for the statistics and planes in parallel for
//! the element-wise pass.

use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{lane_sum, par_written, par_written_then};

/// Per-channel statistics of one training batch.
#[derive(Clone, Debug)]
pub struct BatchStats {
    pub mean: Vec<f32>,
    /// Biased variance (divided by the number of elements per channel).
    pub var: Vec<f32>,
    pub inv_std: Vec<f32>,
    /// The forward pass's map per channel, y = relu(x · scale + shift): the backward pass
    /// finds the ReLU's mask from it and x, rather than reading y as a third stream.
    pub scale: Vec<f32>,
    pub shift: Vec<f32>,
}

fn dims(layout: &Layout) -> Result<(usize, usize, usize)> {
    let (n, c, h, w) = layout.shape().dims4()?;
    Ok((n, c, h * w))
}

/// Mean and biased variance of every channel of `x` [n, c, plane].
///
/// Samples in parallel, each walking its planes in memory order (a channel-major walk jumps a
/// whole sample ahead every plane, which defeats the hardware prefetcher). Each plane gets its
/// own mean and sum of squared deviations from two passes while it sits in L1, and the planes
/// of a channel are combined in f64 with Chan's formula: one read of `x` from memory, and no
/// cancellation of a large mean against its square.
pub(crate) fn statistics(x: &[f32], n: usize, c: usize, plane: usize) -> (Vec<f32>, Vec<f32>) {
    if n == 0 || plane == 0 {
        return (vec![0.0; c], vec![0.0; c]);
    }
    let per_plane: Vec<(f64, f64)> = x
        .par_chunks(plane)
        .map(|p| {
            let (mean, m2) = plane_moments(p);
            (f64::from(mean), f64::from(m2))
        })
        .collect();
    let count = (n * plane) as f64;
    (0..c)
        .map(|ch| {
            let planes = || per_plane.iter().skip(ch).step_by(c);
            let mean = planes().map(|&(m, _)| m).sum::<f64>() / n as f64;
            let m2: f64 = planes()
                .map(|&(m, m2)| m2 + plane as f64 * (m - mean) * (m - mean))
                .sum();
            (mean as f32, (m2 / count) as f32)
        })
        .unzip()
}

/// y = relu(x · scale[c] + shift[c]), planes in parallel.
pub(crate) fn scale_shift_relu(
    x: &[f32],
    c: usize,
    plane: usize,
    scale: &[f32],
    shift: &[f32],
) -> Vec<f32> {
    // SAFETY: chunk `index` of the output and of `x` are equally long (both are cut into
    // planes), and every element of the output chunk is written from its `x`.
    unsafe {
        par_written(x.len(), plane, |index, y| {
            let x = &x[index * plane..][..y.len()];
            relu_affine(y, x, scale[index % c], shift[index % c]);
        })
    }
}

vectorised! {
    /// The mean of one plane and its sum of squared deviations from it: two passes while the
    /// plane sits in L1.
    fn plane_moments(p: &[f32]) -> (f32, f32) {
        let mean = lane_sum(p, |v| v) / p.len() as f32;
        (mean, lane_sum(p, |v| (v - mean) * (v - mean)))
    }
}

vectorised! {
    /// y = relu(x · a + b) over one plane.
    fn relu_affine(y: &mut [MaybeUninit<f32>], x: &[f32], a: f32, b: f32) {
        for (y, &x) in y.iter_mut().zip(x) {
            y.write((x * a + b).max(0.0));
        }
    }
}

/// Training mode: normalises with the batch's statistics, which it keeps for the backward
/// pass and for the layer's running averages.
pub struct BatchNormReluTrain {
    pub eps: f64,
    stats: StatsHandle,
}

/// Where a training forward pass leaves its batch's statistics.
#[derive(Clone, Default)]
pub struct StatsHandle(Arc<Mutex<Option<BatchStats>>>);

impl StatsHandle {
    pub fn get(&self) -> Option<BatchStats> {
        self.0.lock().ok().and_then(|s| s.clone())
    }

    fn set(&self, stats: BatchStats) {
        if let Ok(mut s) = self.0.lock() {
            *s = Some(stats);
        }
    }
}

impl BatchNormReluTrain {
    pub fn new(eps: f64) -> Self {
        Self {
            eps,
            stats: StatsHandle::default(),
        }
    }

    /// A handle on the statistics the forward pass will compute (the op itself moves into
    /// the graph).
    pub fn stats(&self) -> StatsHandle {
        self.stats.clone()
    }
}

impl CustomOp3 for BatchNormReluTrain {
    fn name(&self) -> &'static str {
        "cambrian-batch-norm-relu"
    }

    cpu_fwd!(
        self,
        x @ l1: "batch norm input",
        gamma @ l2: "batch norm gamma",
        beta @ l3: "batch norm beta"
        => {
        let (n, c, plane) = dims(l1)?;
        let (mean, var) = statistics(x, n, c, plane);
        let inv_std: Vec<f32> = var
            .iter()
            .map(|&v| 1.0 / (f64::from(v) + self.eps).sqrt() as f32)
            .collect();
        let scale: Vec<f32> = (0..c).map(|ch| gamma[ch] * inv_std[ch]).collect();
        let shift: Vec<f32> = (0..c).map(|ch| beta[ch] - mean[ch] * scale[ch]).collect();
        let y = scale_shift_relu(x, c, plane, &scale, &shift);
        self.stats.set(BatchStats {
            mean,
            var,
            inv_std,
            scale,
            shift,
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    });

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(stats) = self.stats.get() else {
            candle_core::bail!("batch norm backward before its forward");
        };
        let (n, c, h, w) = x.dims4()?;
        let elements = n * c * h * w;
        let packed = x.apply_op2_no_bwd(
            &dy.contiguous()?,
            &Backward {
                stats,
                gamma: gamma.to_vec1()?,
            },
        )?;
        let dx = packed.narrow(0, 0, elements)?.reshape((n, c, h, w))?;
        let dgamma = packed.narrow(0, elements, c)?;
        let dbeta = packed.narrow(0, elements + c, c)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// The backward pass, from (x, dy): dx, dgamma and dbeta packed into one vector.
pub(crate) struct Backward {
    stats: BatchStats,
    gamma: Vec<f32>,
}

impl Backward {
    /// `scale` and `shift` are the forward pass's own (see [`BatchStats`]).
    pub(crate) fn new(
        mean: Vec<f32>,
        inv_std: Vec<f32>,
        gamma: Vec<f32>,
        scale: Vec<f32>,
        shift: Vec<f32>,
    ) -> Self {
        Self {
            stats: BatchStats {
                mean,
                // Not used by the backward pass.
                var: Vec::new(),
                inv_std,
                scale,
                shift,
            },
            gamma,
        }
    }
}

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        "cambrian-batch-norm-relu-backward"
    }

    cpu_fwd!(self, x @ l1: "batch norm input", dy @ l2: "batch norm output gradient" => {
        let (n, c, plane) = dims(l1)?;
        let BatchStats {
            mean,
            inv_std,
            scale,
            shift,
            ..
        } = &self.stats;
        if dy.len() != x.len() {
            candle_core::bail!(
                "batch norm backward: {} input values but {} gradient values",
                x.len(),
                dy.len()
            );
        }
        if [
            mean.len(),
            inv_std.len(),
            scale.len(),
            shift.len(),
            self.gamma.len(),
        ]
        .iter()
        .any(|&len| len != c)
        {
            candle_core::bail!(
                "batch norm backward: per-channel values for other than {c} channels"
            );
        }
        let count = (n * plane) as f32;
        // Per channel: Σ g and Σ g·x̂, where g is dy through the ReLU (0 where y = 0). Samples
        // in parallel, each walking its planes in memory order: a channel-major walk jumps a
        // whole sample ahead every plane, which defeats the hardware prefetcher.
        let sums: Vec<(f64, f64)> = (0..n)
            .into_par_iter()
            .map(|i| {
                let at = i * c * plane;
                (0..c)
                    .map(|ch| {
                        let at = at + ch * plane;
                        let (g, gx) = plane_sums(
                            &x[at..at + plane],
                            &dy[at..at + plane],
                            &Relu {
                                scale: scale[ch],
                                shift: shift[ch],
                            },
                            mean[ch],
                            inv_std[ch],
                        );
                        (f64::from(g), f64::from(gx))
                    })
                    .collect::<Vec<_>>()
            })
            .reduce(
                || vec![(0.0, 0.0); c],
                |mut a, b| {
                    for (a, b) in a.iter_mut().zip(b) {
                        a.0 += b.0;
                        a.1 += b.1;
                    }
                    a
                },
            );
        let sums: Vec<(f32, f32)> = sums
            .into_iter()
            .map(|(g, gx)| (g as f32, gx as f32))
            .collect();
        // dx, then Σ g·x̂ and Σ g per channel (the γ and β gradients). Not zeroed first: that
        // was a serial memset of the whole batch on the calling thread.
        let tail: Vec<f32> = sums
            .iter()
            .map(|s| s.1)
            .chain(sums.iter().map(|s| s.0))
            .collect();
        // SAFETY: chunk `index` is plane `index` of the batch, and every element of it is
        // written from the same plane of x and dy, which have the batch's length.
        let out = unsafe {
            par_written_then(x.len(), plane, &tail, |index, dx| {
                let at = index * plane;
                let ch = index % c;
                let (sum_g, sum_gx) = sums[ch];
                let (m, s) = (mean[ch], inv_std[ch]);
                let coefficients = InputGrad {
                    relu: Relu {
                        scale: scale[ch],
                        shift: shift[ch],
                    },
                    k: self.gamma[ch] * s / count,
                    count,
                    sum_g,
                    sum_gx,
                    mean: m,
                    inv_std: s,
                };
                let len = dx.len();
                input_grad(dx, &x[at..at + len], &dy[at..at + len], &coefficients);
            })
        };
        Ok((CpuStorage::F32(out), Shape::from(x.len() + 2 * c)))
    });
}

/// One channel's map x ↦ x · scale + shift, before the ReLU.
struct Relu {
    scale: f32,
    shift: f32,
}

impl Relu {
    /// dy through the ReLU: 0 where the forward pass's output was. The same arithmetic as
    /// [`relu_affine`]'s, so the same mask: Rust never fuses the multiply and the add.
    #[inline(always)]
    fn gate(&self, x: f32, dy: f32) -> f32 {
        if x * self.scale + self.shift > 0.0 {
            dy
        } else {
            0.0
        }
    }
}

/// One channel's constants of the input gradient.
struct InputGrad {
    relu: Relu,
    /// γ · inv_std / count.
    k: f32,
    count: f32,
    sum_g: f32,
    sum_gx: f32,
    mean: f32,
    inv_std: f32,
}

vectorised! {
    /// dx over one plane, g being dy through the ReLU.
    fn input_grad(dx: &mut [MaybeUninit<f32>], x: &[f32], dy: &[f32], c: &InputGrad) {
        for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
            let g = c.relu.gate(x, dy);
            dx.write(c.k * (c.count * g - c.sum_g - (x - c.mean) * c.inv_std * c.sum_gx));
        }
    }
}

vectorised! {
    /// Σ g and Σ g·x̂ over one plane, g being dy through the ReLU.
    ///
    /// In blocks: first g alone (an element-wise select, which vectorises), then the two sums
    /// over it in lanes of 8. Written as one loop, the select inside the lane sums made LLVM emit
    /// scalar code with a branch per element.
    fn plane_sums(x: &[f32], dy: &[f32], relu: &Relu, m: f32, s: f32) -> (f32, f32) {
        const BLOCK: usize = 256;
        let mut g = [0f32; BLOCK];
        let (mut sum_g, mut sum_gx) = (0f32, 0f32);
        for (x, dy) in x.chunks(BLOCK).zip(dy.chunks(BLOCK)) {
            let g = &mut g[..x.len()];
            for ((g, &x), &dy) in g.iter_mut().zip(x).zip(dy) {
                *g = relu.gate(x, dy);
            }
            sum_g += lane_sum(g, |v| v);
            sum_gx += lane_dot(g, x, m);
        }
        (sum_g, sum_gx * s)
    }
}

/// Σ g·(x − m) in lanes of 8, like [`lane_sum`].
#[inline]
fn lane_dot(g: &[f32], x: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; 8];
    let (g8, g1) = g.as_chunks::<8>();
    let (x8, x1) = x.as_chunks::<8>();
    for (g, x) in g8.iter().zip(x8) {
        for l in 0..8 {
            acc[l] += g[l] * (x[l] - m);
        }
    }
    acc.iter().sum::<f32>() + g1.iter().zip(x1).map(|(g, x)| g * (x - m)).sum::<f32>()
}

/// Evaluation mode: relu(x · scale + shift) with the running statistics folded into
/// `scale` and `shift`; never differentiated.
pub struct BatchNormReluEval;

impl CustomOp3 for BatchNormReluEval {
    fn name(&self) -> &'static str {
        "cambrian-batch-norm-relu-eval"
    }

    cpu_fwd!(
        self,
        x @ l1: "batch norm input",
        scale @ l2: "batch norm scale",
        shift @ l3: "batch norm shift"
        => {
        let (_, c, plane) = dims(l1)?;
        Ok((
            CpuStorage::F32(scale_shift_relu(x, c, plane, scale, shift)),
            l1.shape().clone(),
        ))
    });
}

#[cfg(test)]
mod tests {
    use super::statistics;

    /// Against a plain f64 two-pass reference, on data whose mean is far larger than its
    /// spread (where Σx² − (Σx)²/n in f32 would lose every digit) and with odd plane sizes.
    #[test]
    fn statistics_match_an_f64_reference() {
        for (n, c, plane, offset) in [(3, 4, 37, 1000.0f32), (2, 5, 1, -3.0), (1, 2, 64, 0.0)] {
            let x: Vec<f32> = (0..n * c * plane)
                .map(|i| offset + ((i * 7919 % 113) as f32 / 113.0 - 0.5) * 0.01)
                .collect();
            let (mean, var) = statistics(&x, n, c, plane);
            for ch in 0..c {
                let values: Vec<f64> = (0..n)
                    .flat_map(|i| &x[(i * c + ch) * plane..][..plane])
                    .map(|&v| f64::from(v))
                    .collect();
                let m = values.iter().sum::<f64>() / values.len() as f64;
                let v = values.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / values.len() as f64;
                assert!(
                    (f64::from(mean[ch]) - m).abs() <= 1e-6 * m.abs().max(1.0),
                    "mean {ch}"
                );
                assert!(
                    (f64::from(var[ch]) - v).abs() <= 1e-3 * v + 1e-12,
                    "var {ch}: {} vs {v}",
                    var[ch]
                );
            }
        }
    }
}
