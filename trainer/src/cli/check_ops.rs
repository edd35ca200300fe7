//! `trainer check-ops`: the project's convolution and batch-norm kernels against Candle's
//! operations on a device (outputs and gradients on random inputs of varied shapes), the way
//! to trust the CUDA kernels on a new GPU.

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;

use super::flags::{DeviceFlag, KernelFlags};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// The default device is auto.
    #[command(flatten)]
    device: DeviceFlag,
    #[command(flatten)]
    kernels: KernelFlags,
}

pub fn run(args: Args) -> Result<()> {
    let device = args.device.open("auto")?;
    let device_name = trainer::device::name(&device);
    let results = trainer::layers::cuda::check::run(&device, &args.kernels.kernels())
        .with_context(|| format!("checking the kernels on {device_name}"))?;
    let mut failed = 0;
    for c in &results {
        let verdict = if c.passed() { "ok  " } else { "FAIL" };
        failed += usize::from(!c.passed());
        println!(
            "{verdict} {:.2e} (tolerance {:.0e})  {}",
            c.error, c.tolerance, c.name
        );
    }
    println!(
        "{} of {} checks passed on {device_name}",
        results.len() - failed,
        results.len(),
    );
    if failed > 0 {
        bail!("{failed} kernel checks failed");
    }
    Ok(())
}
