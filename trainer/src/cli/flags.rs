//! The flags several commands share, declared once and flattened into each command's
//! arguments: the S3 connection, the device, the data folder, and where an experiment comes
//! from.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;
use clap::Args;
use crds::Experiment;
use population::store::{self, Population};
use trainer::layers::{CpuConvolution, CudaConvolution, Kernels};

/// How to reach an S3 store named on the command line (ignored for `file://` stores).
#[derive(Args, Debug)]
pub struct S3Flags {
    /// S3 endpoint of an S3-compatible server.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub endpoint: Option<String>,
    #[arg(long, env = "AWS_REGION")]
    pub region: Option<String>,
    /// Path-style addressing (endpoint/bucket/key), which most S3-compatible servers need.
    #[arg(long)]
    pub path_style: bool,
}

impl S3Flags {
    /// The population in the store at `url` (`s3://bucket/prefix` or `file:///path`), with
    /// the SDK's credential chain.
    pub async fn open(&self, url: &str) -> Result<Population> {
        let spec = crds::StoreSpec {
            url: url.to_string(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            path_style: self.path_style,
            credentials_secret: None,
            retention: crds::Retention::Retain,
        };
        Ok(Population::new(store::open(&spec).await?))
    }
}

/// Which device trains or evaluates.
#[derive(Args, Debug)]
pub struct DeviceFlag {
    /// cpu, cuda, cuda:N or auto (CUDA when present, else the CPU).
    #[arg(long, env = "CAMBRIAN_DEVICE")]
    pub device: Option<String>,
}

impl DeviceFlag {
    /// The device named, else `default`.
    pub fn open(&self, default: &str) -> Result<Device> {
        Ok(trainer::device::open(
            self.device.as_deref().unwrap_or(default),
        )?)
    }
}

/// How convolutions run.
#[derive(Args, Debug)]
pub struct KernelFlags {
    /// CPU: auto (Winograd where the shape takes it, else im2col + GEMM) or im2col.
    #[arg(long, env = "CAMBRIAN_CPU_CONV", default_value_t = CpuConvolution::Auto)]
    pub cpu_conv: CpuConvolution,
    /// CUDA: gemm (im2col + cuBLAS) or cudnn (a build with the cudnn feature).
    #[arg(long, env = "CAMBRIAN_CONV", default_value_t = CudaConvolution::Gemm)]
    pub cuda_conv: CudaConvolution,
    /// Sample groups of the GEMM convolutions (1: never group); default: chosen by shape.
    #[arg(long, env = "CAMBRIAN_CONV_GROUPS")]
    pub conv_groups: Option<usize>,
}

impl KernelFlags {
    /// The device's own kernels, with these convolutions.
    pub fn kernels(&self) -> Kernels {
        Kernels {
            path: None,
            cpu_convolution: self.cpu_conv,
            cuda_convolution: self.cuda_conv,
            conv_groups: self.conv_groups,
        }
    }
}

/// Where the images are.
#[derive(Args, Debug)]
pub struct DataFlag {
    /// Folder with the official CIFAR binary files (or the folder that holds it); without it,
    /// the experiment's data source is fetched into the cache.
    #[arg(long, env = "CAMBRIAN_DATA")]
    pub data: Option<PathBuf>,
}

/// Where a worker or an evaluation finds its experiment: a manifest file, or the JSON the
/// operator puts in its pods' environment.
#[derive(Args, Debug)]
pub struct ExperimentFlags {
    /// The EvolutionExperiment manifest; or set CAMBRIAN_EXPERIMENT to it in JSON.
    #[arg(long, env = "CAMBRIAN_MANIFEST")]
    pub manifest: Option<PathBuf>,
    #[arg(long, env = "CAMBRIAN_EXPERIMENT", hide_env_values = true)]
    pub experiment: Option<String>,
}

impl ExperimentFlags {
    /// The experiment, validated; `None` when neither is given.
    pub fn load(&self) -> Result<Option<Experiment>> {
        Ok(match (&self.manifest, &self.experiment) {
            (Some(path), _) => Some(crds::manifest::load(path)?),
            (None, Some(json)) => {
                let (experiment, dropped) =
                    crds::manifest::parse_from_operator("CAMBRIAN_EXPERIMENT", json)?;
                if !dropped.is_empty() {
                    tracing::warn!(
                        experiment = %experiment.name,
                        fields = %dropped.join(", "),
                        "the operator is newer than this trainer: ignoring fields it does not know (use a trainer image of the operator's version to use them)"
                    );
                }
                Some(experiment)
            }
            (None, None) => None,
        })
    }
}
