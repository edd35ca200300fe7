//! Training (§3.4) and evaluation of one individual: SGD with momentum on augmented batches
//! for a fixed number of steps, cross-entropy loss, then one pass over held-out images in
//! evaluation mode.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::Optimizer;
use serde::{Deserialize, Serialize};

use crate::data::{evaluation_batches, Images, Normalization, TrainingBatches};
use crate::model::Model;
use crate::optim::{Sgd, SgdConfig};

/// How often the loss is read back from the device: reading it every step would force a
/// host-device synchronisation per step.
const LOSS_READ_INTERVAL: u64 = 50;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("training step {step}: {source}")]
    Step {
        step: u64,
        source: candle_core::Error,
    },
    #[error("evaluation: {0}")]
    Evaluation(candle_core::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub steps: u64,
    pub batch_size: usize,
    pub momentum: f64,
    pub weight_decay: f64,
    pub augment: bool,
    pub seed: u64,
}

impl TrainConfig {
    /// §3.4: batch 50, momentum 0.9, weight decay 1e-4, augmentation on.
    pub fn paper(steps: u64, seed: u64) -> Self {
        Self {
            steps,
            batch_size: 50,
            momentum: 0.9,
            weight_decay: 1e-4,
            augment: true,
            seed,
        }
    }
}

/// A spec's training settings; each child's seed is set when it is trained.
impl From<&crds::TrainingSpec> for TrainConfig {
    fn from(spec: &crds::TrainingSpec) -> Self {
        Self {
            steps: spec.steps,
            batch_size: spec.batch_size as usize,
            momentum: spec.momentum,
            weight_decay: spec.weight_decay,
            augment: true,
            seed: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    pub steps: u64,
    /// Mean loss over the first and the last stretch of (up to) 50 steps.
    pub first_loss: f32,
    pub last_loss: f32,
    /// The loss became NaN or infinite; training stopped there.
    pub diverged: bool,
    /// Training was interrupted by the stop signal before `steps`.
    pub interrupted: bool,
    pub seconds: f64,
}

/// Trains `model` in place. `should_stop` is polled between steps so that an experiment's stop
/// condition interrupts long trainings.
pub fn train(
    model: &Model,
    learning_rate: f64,
    images: &Images,
    normalization: &Normalization,
    config: &TrainConfig,
    device: &Device,
    should_stop: &dyn Fn() -> bool,
) -> Result<TrainReport, TrainError> {
    let start = Instant::now();
    let mut optimizer = Sgd::new(
        model.trainable().to_vec(),
        SgdConfig {
            learning_rate,
            momentum: config.momentum,
            weight_decay: config.weight_decay,
            kernels: *model.kernels(),
        },
    )
    .map_err(|source| TrainError::Step { step: 0, source })?;
    let mut batches = TrainingBatches::new(images, normalization, config.seed, config.augment);
    let mut window = Tensor::zeros((), DType::F32, device)
        .map_err(|source| TrainError::Step { step: 0, source })?;
    let mut window_len = 0u64;
    let mut first_loss = None;
    let mut last_loss = f32::NAN;
    let mut diverged = false;
    let mut interrupted = false;
    let mut step = 0;
    while step < config.steps {
        if should_stop() {
            interrupted = true;
            break;
        }
        let at = step;
        let err = move |source| TrainError::Step { step: at, source };
        let batch = batches.next_batch(config.batch_size, device).map_err(err)?;
        let logits = model.forward_t(&batch.images, true).map_err(err)?;
        let loss =
            crate::layers::cross_entropy(&logits, &batch.labels, model.kernels()).map_err(err)?;
        optimizer.backward_step(&loss).map_err(err)?;
        window = (window + loss.detach()).map_err(err)?;
        window_len += 1;
        step += 1;
        if window_len == LOSS_READ_INTERVAL || step == config.steps {
            let mean = window.to_scalar::<f32>().map_err(err)? / window_len as f32;
            first_loss.get_or_insert(mean);
            last_loss = mean;
            window = window.zeros_like().map_err(err)?;
            window_len = 0;
            if !mean.is_finite() {
                diverged = true;
                break;
            }
        }
    }
    Ok(TrainReport {
        steps: step,
        first_loss: first_loss.unwrap_or(f32::NAN),
        last_loss,
        diverged,
        interrupted,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
    pub seconds: f64,
}

/// Accuracy of `model` (in evaluation mode) on `images`. Non-finite logits count as wrong.
pub fn evaluate(
    model: &Model,
    images: &Images,
    normalization: &Normalization,
    batch_size: usize,
    device: &Device,
) -> Result<Evaluation, TrainError> {
    let start = Instant::now();
    let mut correct = 0usize;
    for batch in evaluation_batches(images, normalization, batch_size, device) {
        let batch = batch.map_err(TrainError::Evaluation)?;
        let logits = model
            .forward_t(&batch.images, false)
            .map_err(TrainError::Evaluation)?;
        // 0 * x is 0 exactly when x is finite: a row with any NaN or infinity is wrong.
        let hits = logits
            .argmax(1)
            .and_then(|p| p.eq(&batch.labels)?.to_dtype(DType::U32))
            .and_then(|hits| {
                let finite = (&logits * 0.0)?.sum_keepdim(1)?.squeeze(1)?.eq(0f32)?;
                (hits * finite.to_dtype(DType::U32)?)?
                    .sum_all()?
                    .to_scalar::<u32>()
            })
            .map_err(TrainError::Evaluation)?;
        correct += hits as usize;
    }
    let total = images.len();
    Ok(Evaluation {
        correct,
        total,
        accuracy: if total == 0 {
            0.0
        } else {
            correct as f64 / total as f64
        },
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{fixture, Split};
    use crds::Dataset;
    use population::dna::Dna;
    use population::dna::ModelSpec;
    use population::mutation::Mutation;
    use population::seed::{rng, Stream};

    fn validate(model: &Model, split: &Split) -> Evaluation {
        evaluate(
            model,
            &split.validation,
            &split.normalization,
            100,
            &Device::Cpu,
        )
        .unwrap()
    }

    fn tiny_split() -> Split {
        let dir = tempfile::tempdir().unwrap();
        fixture::write(dir.path(), Dataset::Cifar10, 120, 11).unwrap();
        Split::load(dir.path(), Dataset::Cifar10, 0, None).unwrap()
    }

    #[test]
    fn training_lowers_the_loss_and_learns() {
        let split = tiny_split();
        let mut dna = Dna::initial();
        let mut r = rng(0, Stream::Mutation);
        Mutation::InsertConvolution.apply(&mut dna, &mut r).unwrap();
        dna.learning_rate = 0.01;
        let model = Model::fresh(&dna, ModelSpec::cifar(10), 0, &Device::Cpu).unwrap();
        let config = TrainConfig {
            augment: false,
            ..TrainConfig::paper(200, 3)
        };
        let before = validate(&model, &split);
        let report = train(
            &model,
            dna.learning_rate,
            &split.train,
            &split.normalization,
            &config,
            &Device::Cpu,
            &|| false,
        )
        .unwrap();
        assert_eq!(report.steps, 200);
        assert!(!report.diverged);
        assert!(report.last_loss < 0.5 * report.first_loss, "{report:?}");
        let after = validate(&model, &split);
        assert_eq!(after.total, 60);
        assert!(
            after.accuracy > before.accuracy.max(0.5),
            "{before:?} -> {after:?}"
        );
    }

    #[test]
    fn stop_signal_interrupts_training() {
        let split = tiny_split();
        let model = Model::fresh(&Dna::initial(), ModelSpec::cifar(10), 0, &Device::Cpu).unwrap();
        let calls = std::cell::Cell::new(0);
        let stop = || {
            calls.set(calls.get() + 1);
            calls.get() > 3
        };
        let report = train(
            &model,
            0.01,
            &split.train,
            &split.normalization,
            &TrainConfig::paper(100, 0),
            &Device::Cpu,
            &stop,
        )
        .unwrap();
        assert_eq!(report.steps, 3);
        assert!(report.interrupted);
    }

    #[test]
    fn divergence_stops_training_and_scores_zero() {
        let split = tiny_split();
        let model = Model::fresh(&Dna::initial(), ModelSpec::cifar(10), 0, &Device::Cpu).unwrap();
        let report = train(
            &model,
            1e12,
            &split.train,
            &split.normalization,
            &TrainConfig::paper(200, 0),
            &Device::Cpu,
            &|| false,
        )
        .unwrap();
        assert!(report.diverged, "{report:?}");
        assert!(report.steps < 200);
        let eval = validate(&model, &split);
        assert_eq!(eval.correct, 0);
    }
}
