//! The child trainer: what turns a DNA into a trained, evaluated individual (§3.4, §3.5).
//! The worker loop hands it a job and publishes what comes back; the real trainer trains with
//! Candle, and the coordination benchmark substitutes one that returns at once.

use std::sync::Arc;

use bytes::Bytes;
use candle_core::Device;

use population::cost::{Flops, Memory};
use population::dna::{Dna, ModelSpec};
use population::individual::Outcome;
use population::seed::{self, Stream};
use population::stop::StopFlag;

use crate::data::Split;
use crate::device;
use crate::layers::Kernels;
use crate::model::{Model, ModelError};
use crate::threads;
use crate::train::{self, TrainConfig, TrainError};
use crate::weights::{Weights, WeightsError};

/// Why a child could not be trained.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("starting the training threads: {0}")]
    Threads(#[from] rayon::ThreadPoolBuildError),
    #[error("the model needs about {needed_mib} MiB to train ({parameters} parameters) and {device} has {available_mib} MiB to spare")]
    TooLarge {
        needed_mib: u64,
        available_mib: u64,
        parameters: u64,
        device: String,
    },
    #[error(
        "the model has {parameters} parameters, more than spec.training.maxParameters ({limit})"
    )]
    TooManyParameters { parameters: u64, limit: u64 },
    #[error("the training diverged: the loss is not finite")]
    Diverged,
}

/// A child to train: its DNA, what it may inherit, and its seed.
pub struct ChildJob {
    pub dna: Dna,
    pub parent_weights: Option<Bytes>,
    pub seed: u64,
}

/// A trained and evaluated child, everything but the overhead accounting.
pub struct TrainedChild {
    pub outcome: Outcome,
    pub weights: Bytes,
    pub inherited_tensors: usize,
    pub fresh_tensors: usize,
    /// Stopped before the end of training; such a child is not put in the population.
    pub interrupted: bool,
}

/// What turns a DNA into a trained, evaluated individual. The real one trains with Candle; the
/// coordination benchmark substitutes one that returns at once.
pub trait ChildTrainer: Send + Sync {
    fn train_child(&self, job: ChildJob, stop: &StopFlag) -> Result<TrainedChild, ChildError>;
}

/// Trains on CIFAR with Candle, as §3.4 says.
pub struct CandleTrainer {
    pub data: Arc<Split>,
    pub config: TrainConfig,
    pub device: Device,
    /// TF32 matrix products on CUDA (`spec.training.tf32`).
    pub tf32: bool,
    /// Threads per training on the CPU ([`crate::threads`]): the cores shared out between
    /// the worker loops that use this trainer at once ([`crate::threads::cpu_share`]).
    pub cpu_threads: usize,
    pub kernels: Kernels,
    /// Bytes a child may use; `None`: what the device has free when the child starts.
    pub memory_limit: Option<u64>,
    /// `spec.training.maxParameters`.
    pub max_parameters: Option<u64>,
}

impl ChildTrainer for CandleTrainer {
    fn train_child(&self, job: ChildJob, stop: &StopFlag) -> Result<TrainedChild, ChildError> {
        threads::run_on_cpu_pool(&self.device, self.cpu_threads, || {
            self.train_here(job, stop)
        })?
    }
}

impl CandleTrainer {
    fn train_here(&self, job: ChildJob, stop: &StopFlag) -> Result<TrainedChild, ChildError> {
        let tf32 = self.tf32 && self.device.is_cuda();
        if tf32 {
            candle_core::cuda::set_gemm_reduced_precision_f32(true);
        }
        let spec = ModelSpec::cifar(self.data.kind.classes());
        self.check_memory(&job.dna, spec)?;
        let parent = job
            .parent_weights
            .map(|bytes| Weights::from_safetensors(&bytes, &self.device))
            .transpose()?;
        let (model, inheritance) = Model::build(
            &job.dna,
            spec,
            parent.as_ref(),
            &mut seed::rng(job.seed, Stream::Initialisation),
            &self.device,
        )?;
        let model = model.with_kernels(self.kernels);
        let config = TrainConfig {
            seed: job.seed,
            ..self.config
        };
        let report = train::train(
            &model,
            job.dna.learning_rate,
            &self.data.train,
            &self.data.normalization,
            &config,
            &self.device,
            &|| stop.is_stopped(),
        )?;
        if report.diverged {
            return Err(ChildError::Diverged);
        }
        let evaluation = if report.interrupted {
            None
        } else {
            Some(train::evaluate(
                &model,
                &self.data.validation,
                &self.data.normalization,
                500,
                &self.device,
            )?)
        };
        let weights = Bytes::from(model.weights().to_safetensors()?);
        let validation_total = self.data.validation.len();
        let flops = Flops::of(&job.dna, spec).individual(
            report.steps * config.batch_size as u64,
            validation_total as u64,
        );
        Ok(TrainedChild {
            outcome: Outcome {
                validation_accuracy: evaluation.map_or(0.0, |e| e.accuracy),
                validation_correct: evaluation.map_or(0, |e| e.correct),
                validation_total,
                steps: report.steps,
                diverged: report.diverged,
                first_loss: Some(report.first_loss).filter(|l| l.is_finite()),
                last_loss: Some(report.last_loss).filter(|l| l.is_finite()),
                flops,
                parameters: model.parameter_count(),
                convolutions: job.dna.convolution_count(),
                training_seconds: report.seconds,
                evaluation_seconds: evaluation.map_or(0.0, |e| e.seconds),
                overhead_seconds: 0.0,
                tf32,
                device: device::name(&self.device),
                failure: None,
            },
            weights,
            inherited_tensors: inheritance.inherited.len(),
            fresh_tensors: inheritance.fresh.len(),
            interrupted: report.interrupted,
        })
    }
}

impl CandleTrainer {
    /// Refuses a model whose training would not fit in the memory its device has to spare:
    /// better one failed individual than a worker killed by the kernel or the driver.
    fn check_memory(&self, dna: &Dna, spec: ModelSpec) -> Result<(), ChildError> {
        let memory = Memory::of(dna, spec);
        if let Some(limit) = self.max_parameters.filter(|l| memory.parameters > *l) {
            return Err(ChildError::TooManyParameters {
                parameters: memory.parameters,
                limit,
            });
        }
        let needed = memory.training_bytes(self.config.batch_size);
        let Some(available) = self
            .memory_limit
            .or_else(|| device::free_memory(&self.device))
        else {
            return Ok(());
        };
        if needed > available {
            return Err(ChildError::TooLarge {
                needed_mib: needed >> 20,
                available_mib: available >> 20,
                parameters: memory.parameters,
                device: device::name(&self.device),
            });
        }
        Ok(())
    }

    /// The trainer of an experiment: its training settings, on `device`, with the CPU's cores
    /// shared between `loops` worker loops training at once.
    pub fn for_spec(
        spec: &crds::TrainingSpec,
        data: Arc<Split>,
        device: Device,
        loops: usize,
    ) -> Self {
        Self {
            data,
            config: TrainConfig::from(spec),
            device,
            tf32: spec.tf32,
            cpu_threads: threads::cpu_share(loops),
            kernels: Kernels::default(),
            memory_limit: None,
            max_parameters: spec.max_parameters,
        }
    }
}
