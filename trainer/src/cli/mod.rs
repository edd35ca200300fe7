//! The binary's commands that orchestrate library pieces: a local experiment, a worker pod,
//! reports and the final evaluation.

pub mod memory;
pub mod report;
pub mod run;
pub mod worker;

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// `auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`.
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            let device = Device::cuda_if_available(0).unwrap_or(Device::Cpu);
            tracing::info!(device = ?device, "device chosen automatically");
            Ok(device)
        }
        other => {
            let index = match other.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                    .with_context(|| format!("device {other:?}: expected cuda:N"))?,
                None => bail!("unknown device {other:?}: expected auto, cpu, cuda or cuda:N"),
            };
            Device::new_cuda(index).with_context(|| {
                format!("device {other}: this build or this machine has no CUDA (build with --features cuda)")
            })
        }
    }
}

/// A worker-independent seed for worker `index` of an experiment seeded `seed`.
pub fn worker_seed(seed: u64, index: u64) -> u64 {
    // SplitMix64 of the pair, so that neighbouring seeds give unrelated workers.
    let mut z = seed ^ index.wrapping_mul(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

pub fn random_suffix() -> String {
    format!("{:04x}", rand::random::<u16>())
}
