//! The classifier's fully connected layer on the CPU as one op: y = x·Wᵀ + b, with its
//! gradients as GEMMs on the operands as they lie.
//!
//! Composed from Candle's operations, the transpose of W was copied in both passes, the bias
//! was a broadcast addition with its own reduction in the backward pass, and every Candle
//! matmul asked `num_cpus` for the machine's physical cores, which reads `/proc/cpuinfo`.
//! For the paper's initial (linear) model, that overhead was most of a training step.
//!
//! ```text
//! forward      y  = x · Wᵀ + b     [N×I]·[I×O]
//! input grad   dx = dy · W         [N×O]·[O×I]
//! weight grad  dW = dyᵀ · x        [O×N]·[N×I]
//! bias grad    db = Σn dy
//! ```

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{transpose, GemmOperand};

/// Below this many multiply-adds a product runs on the calling thread; above it, in column
/// (or row) blocks on rayon's threads.
const PARALLEL_WORK: usize = 1 << 20;

/// y = x·Wᵀ + b for x [N×I], W [O×I], b [O]; differentiable in all three.
pub struct Linear;

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "cambrian-linear"
    }

    cpu_fwd!(self, x @ l1: "linear input", w @ l2: "linear weight", b @ l3: "linear bias" => {
        let (n, i) = l1.shape().dims2()?;
        let (o, wi) = l2.shape().dims2()?;
        if wi != i || b.len() != o {
            candle_core::bail!(
                "linear: input [{n}, {i}], weight [{o}, {wi}], bias [{}]",
                b.len()
            );
        }
        let mut y = vec![0f32; n * o];
        for row in y.chunks_exact_mut(o.max(1)) {
            row.copy_from_slice(b);
        }
        by_rows(&mut y, o, n, i * o, |rows, y| {
            // Wᵀ: [I×O], read from W [O×I] with swapped strides.
            GemmOperand::row_major(&x[rows.start * i..rows.end * i], i).times(
                &GemmOperand::transposed(w, i),
                y,
                rows.len(),
                o,
                i,
                true,
            );
        });
        Ok((CpuStorage::F32(y), Shape::from((n, o))))
    });

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = if x.track_op() {
            Some(dy.apply_op2_no_bwd(w, &InputGrad)?)
        } else {
            None
        };
        let (o, i) = w.dims2()?;
        let packed = x.apply_op2_no_bwd(&dy, &ParamGrad)?;
        let dw = packed.narrow(0, 0, o * i)?.reshape((o, i))?;
        let db = packed.narrow(0, o * i, o)?;
        Ok((dx, Some(dw), Some(db)))
    }
}

/// Runs `f(rows, out_rows)` over `out` [rows × columns], in row blocks on rayon's threads if
/// the product is worth it (`work` multiply-adds per row).
fn by_rows(
    out: &mut [f32],
    columns: usize,
    rows: usize,
    work: usize,
    f: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) {
    let threads = rayon::current_num_threads().max(1);
    if rows * work < PARALLEL_WORK || threads == 1 || rows < 2 || columns == 0 {
        f(0..rows, out);
        return;
    }
    let per = rows.div_ceil(threads);
    out.par_chunks_mut(per * columns)
        .enumerate()
        .for_each(|(block, out)| {
            let start = block * per;
            f(start..start + out.len() / columns, out)
        });
}

/// dx = dy·W from (dy, W).
struct InputGrad;

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "cambrian-linear-input-grad"
    }

    cpu_fwd!(self, dy @ l1: "linear output gradient", w @ l2: "linear weight" => {
        let (n, o) = l1.shape().dims2()?;
        let (_, i) = l2.shape().dims2()?;
        let mut dx = vec![0f32; n * i];
        by_rows(&mut dx, i, n, i * o, |rows, dx| {
            GemmOperand::row_major(&dy[rows.start * o..rows.end * o], o).times(
                &GemmOperand::row_major(w, i),
                dx,
                rows.len(),
                i,
                o,
                false,
            );
        });
        Ok((CpuStorage::F32(dx), Shape::from((n, i))))
    });
}

/// dW [O×I] and db [O] from (x, dy), packed into one vector.
struct ParamGrad;

impl CustomOp2 for ParamGrad {
    fn name(&self) -> &'static str {
        "cambrian-linear-param-grad"
    }

    cpu_fwd!(self, x @ l1: "linear input", dy @ l2: "linear output gradient" => {
        let (n, i) = l1.shape().dims2()?;
        let (_, o) = l2.shape().dims2()?;
        let mut grads = vec![0f32; o * i + o];
        let (dw, db) = grads.split_at_mut(o * i);
        // dWᵀ [I×O] = xᵀ·dy, in blocks of I (rows of dWᵀ, columns of dW) on rayon's threads:
        // O is the number of classes, too few rows to split.
        let mut dwt = vec![0f32; i * o];
        by_rows(&mut dwt, o, i, n * o, |rows, dwt| {
            // xᵀ rows `rows`: [len×N], read from x [N×I] with swapped strides.
            GemmOperand::transposed(&x[rows.start..], i).times(
                &GemmOperand::row_major(dy, o),
                dwt,
                rows.len(),
                o,
                n,
                false,
            );
        });
        transpose(&dwt, i, o, dw);
        for row in dy.chunks_exact(o.max(1)) {
            for (db, &v) in db.iter_mut().zip(row) {
                *db += v;
            }
        }
        Ok((CpuStorage::F32(grads), Shape::from(o * i + o)))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::cpu::max_diff;
    use candle_core::{Device, Var};

    /// Against Candle's matmul + broadcast add: output and the three gradients, on fresh
    /// random inputs, including sizes above the parallel threshold.
    #[test]
    fn matches_candle_outputs_and_gradients() {
        let d = Device::Cpu;
        for (n, i, o) in [
            (1, 1, 1),
            (3, 7, 2),
            (50, 3072, 10),
            (4, 300_000, 5),
            (700, 2100, 3),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (n, i), &d).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (o, i), &d).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::randn(0f32, 1., o, &d).unwrap()).unwrap();
            let g = Tensor::randn(0f32, 1., (n, o), &d).unwrap();
            let ours = x
                .as_tensor()
                .apply_op3(w.as_tensor(), b.as_tensor(), Linear)
                .unwrap();
            let reference = x
                .as_tensor()
                .matmul(&w.as_tensor().t().unwrap())
                .unwrap()
                .broadcast_add(b.as_tensor())
                .unwrap();
            let tolerance = 1e-5 * (i as f32).sqrt().max(1.0) * 10.0;
            assert!(
                max_diff(&ours, &reference) < tolerance,
                "forward {:?}",
                (n, i, o)
            );
            let ga = (&ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (&reference * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, var) in [("input", &x), ("weight", &w), ("bias", &b)] {
                let diff = max_diff(ga.get(var).unwrap(), gb.get(var).unwrap());
                assert!(diff < tolerance, "{name} gradient {:?}: {diff}", (n, i, o));
            }
        }
    }
}
