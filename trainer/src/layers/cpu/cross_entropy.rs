//! Softmax cross-entropy on the CPU as one op: the mean over the batch of
//! `-log softmax(logits)[label]`, with its gradient `(softmax − onehot) / batch` computed in
//! one pass. Composed from Candle's operations it is eight ops and as many backward steps,
//! which for the paper's initial linear model cost more than the model itself.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::contiguous;

fn labels<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [u32]> {
    let CpuStorage::U32(data) = storage else {
        candle_core::bail!("cross entropy: labels must be u32");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("cross entropy: labels must be contiguous"),
    }
}

/// Log-sum-exp of a row, stable for large logits.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    max + row.iter().map(|&v| (v - max).exp()).sum::<f32>().ln()
}

/// Mean cross-entropy of `logits` [batch, classes] against `labels` [batch].
pub struct CrossEntropy;

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cambrian-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let logits = contiguous(s1, l1, "cross entropy logits")?;
        let labels = labels(s2, l2)?;
        let (batch, classes) = l1.shape().dims2()?;
        if labels.len() != batch {
            candle_core::bail!(
                "cross entropy: {} labels for a batch of {batch}",
                labels.len()
            );
        }
        let mut total = 0f64;
        for (row, &label) in logits.chunks_exact(classes).zip(labels) {
            let Some(&target) = row.get(label as usize) else {
                candle_core::bail!("cross entropy: label {label} out of {classes} classes");
            };
            total += f64::from(log_sum_exp(row) - target);
        }
        Ok((
            CpuStorage::F32(vec![(total / batch as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dlogits = logits.apply_op2_no_bwd(labels, &Gradient)?;
        Ok((Some(dlogits.broadcast_mul(grad)?), None))
    }
}

/// (softmax(logits) − onehot(labels)) / batch.
struct Gradient;

impl CustomOp2 for Gradient {
    fn name(&self) -> &'static str {
        "cambrian-cross-entropy-gradient"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let logits = contiguous(s1, l1, "cross entropy logits")?;
        let labels = labels(s2, l2)?;
        let (batch, classes) = l1.shape().dims2()?;
        let mut out = vec![0f32; logits.len()];
        let scale = 1.0 / batch as f32;
        for ((row, out), &label) in logits
            .chunks_exact(classes)
            .zip(out.chunks_exact_mut(classes))
            .zip(labels)
        {
            let lse = log_sum_exp(row);
            for (o, &v) in out.iter_mut().zip(row) {
                *o = (v - lse).exp() * scale;
            }
            if let Some(o) = out.get_mut(label as usize) {
                *o -= scale;
            }
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::cpu::max_diff;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candle_loss_and_gradient() {
        let d = Device::Cpu;
        let logits =
            Var::from_tensor(&(Tensor::randn(0f32, 3., (7, 10), &d).unwrap() + 50.0).unwrap())
                .unwrap();
        let labels = Tensor::new(&[0u32, 3, 9, 9, 1, 5, 2], &d).unwrap();
        let ours = logits.as_tensor().apply_op2(&labels, CrossEntropy).unwrap();
        let reference = candle_nn::loss::cross_entropy(logits.as_tensor(), &labels).unwrap();
        let (a, b): (f32, f32) = (ours.to_scalar().unwrap(), reference.to_scalar().unwrap());
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        let ga = (ours * 3.0).unwrap().backward().unwrap();
        let gb = (reference * 3.0).unwrap().backward().unwrap();
        let diff = max_diff(
            ga.get(logits.as_tensor()).unwrap(),
            gb.get(logits.as_tensor()).unwrap(),
        );
        assert!(diff < 1e-6, "{diff}");
    }

    #[test]
    fn bad_label_is_an_error() {
        let d = Device::Cpu;
        let logits = Tensor::zeros((1, 3), candle_core::DType::F32, &d).unwrap();
        let labels = Tensor::new(&[7u32], &d).unwrap();
        assert!(logits.apply_op2(&labels, CrossEntropy).is_err());
    }
}
