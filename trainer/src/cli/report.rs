//! `trainer report STORE`: what any store holds, at any time: a summary, the best individual
//! exported, the progress plot.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;
use clap::Args as ClapArgs;
use population::store::Population;
use trainer::export;
use trainer::report::{self, TestBench};

use super::flags::{DataFlag, DeviceFlag, S3Flags};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// s3://bucket/prefix or file:///path
    store: String,
    #[command(flatten)]
    s3: S3Flags,
    /// With a data folder, the best individual's test accuracy is measured (§3.7).
    #[command(flatten)]
    data: DataFlag,
    /// Where the export and the plot go.
    #[arg(long, default_value = "cambrian-report")]
    out: PathBuf,
    /// The default device is the CPU.
    #[command(flatten)]
    device: DeviceFlag,
}

pub async fn run(args: Args) -> Result<()> {
    let population = args.s3.open(&args.store).await?;
    write_report(
        &population,
        ReportTarget {
            out: args.out,
            data: args.data.data,
            device: args.device.open("cpu")?,
        },
    )
    .await
}

pub struct ReportTarget {
    pub out: PathBuf,
    /// The data folder, for the test accuracy; without it the test set is not touched.
    pub data: Option<PathBuf>,
    pub device: Device,
}

/// Summary on standard output; best individual exported and progress plot drawn into `out`.
pub async fn write_report(population: &Population, target: ReportTarget) -> Result<()> {
    let gathered = report::gather(population).await?;
    if gathered.individuals.is_empty() {
        println!("{} holds no trained individual yet", population.url());
        return Ok(());
    }
    let best = match report::best_readable(population, &gathered).await {
        Ok(best) => Some(best),
        Err(e) => {
            eprintln!("no individual can be exported: {e}");
            None
        }
    };
    let bench = match &target.data {
        Some(dir) if best.is_some() => {
            match TestBench::load_async(&gathered.record.spec, dir, &target.device).await {
                Ok(bench) => Some(bench),
                Err(e) => {
                    eprintln!("test accuracy not measured and no ONNX model written: {e}");
                    None
                }
            }
        }
        _ => None,
    };
    let test = match (&bench, &best) {
        (Some(bench), Some(best)) => match report::evaluate_best(population, best, bench).await {
            Ok(result) => Some(result),
            Err(e) => {
                eprintln!("test accuracy not measured: {e}");
                None
            }
        },
        _ => None,
    };
    print!(
        "{}",
        report::summary_text(&gathered, best.as_ref(), test.as_ref())
    );
    std::fs::create_dir_all(&target.out)?;
    let plot = target.out.join("progress.svg");
    report::plot(&gathered, &plot)?;
    if let Some(best) = &best {
        let normalization = bench.as_ref().map(|b| b.normalization());
        let dir = target.out.join("best");
        match export::write(&gathered, best, test.as_ref(), normalization, &dir).await {
            Ok(exported) => {
                println!("exported     {}", exported.dir.display());
                if exported.onnx.is_none() {
                    println!("             (no model.onnx without --data: its input's normalisation comes from the training images)");
                }
            }
            Err(e) => eprintln!("best individual not exported: {e}"),
        }
    }
    println!("plot         {}", plot.display());
    Ok(())
}
