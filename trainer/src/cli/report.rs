//! `trainer report STORE`: what any store holds, at any time: a summary, the best individual
//! exported, the progress plot.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;
use clap::Args as ClapArgs;
use population::store::Population;
use trainer::report;

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
    let test = match (&target.data, &best) {
        (Some(dir), Some(best)) => {
            match report::evaluate_best(population, &gathered, best, dir, &target.device).await {
                Ok(result) => Some(result),
                Err(e) => {
                    eprintln!("test accuracy not measured: {e}");
                    None
                }
            }
        }
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
        match report::export_best(best, test.as_ref(), &target.out.join("best")).await {
            Ok(dir) => println!("exported     {}", dir.display()),
            Err(e) => eprintln!("best individual not exported: {e}"),
        }
    }
    println!("plot         {}", plot.display());
    Ok(())
}
