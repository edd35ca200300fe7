//! `trainer export STORE`: the best individual (or any, by id) of any store, for use outside
//! cambrian: an ONNX model beside the DNA, weights and record, and pictures of its network and
//! its lineage.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use trainer::data::source;
use trainer::export;
use trainer::report::{self, TestBench};

use super::flags::{DataFlag, DeviceFlag, S3Flags};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// s3://bucket/prefix or file:///path
    store: String,
    #[command(flatten)]
    s3: S3Flags,
    /// The individual to export (default: the best by validation whose weights load).
    #[arg(long)]
    id: Option<String>,
    /// The ONNX model's input normalisation is computed from the experiment's training
    /// images, and its test accuracy measured (once, and recorded) on the test images.
    #[command(flatten)]
    data: DataFlag,
    #[arg(long, default_value = "cambrian-export")]
    out: PathBuf,
    /// The default device is the CPU.
    #[command(flatten)]
    device: DeviceFlag,
}

pub async fn run(args: Args) -> Result<()> {
    let population = args.s3.open(&args.store).await?;
    let gathered = report::gather(&population).await?;
    let readable = match &args.id {
        Some(id) => report::readable(&population, &gathered, id).await?,
        None => report::best_readable(&population, &gathered).await?,
    };
    for (id, why) in &readable.skipped {
        eprintln!("skipped {id}, better by validation: {why}");
    }
    let spec = &gathered.record.spec;
    let data = match args.data.data {
        Some(dir) => dir,
        None => source::resolve(&spec.data, &source::default_cache(), &spec.store)
            .await
            .context(
                "fetching the experiment's data, for the model's normalisation (or give --data)",
            )?,
    };
    let device = args.device.open("cpu")?;
    let bench = TestBench::load_async(spec, &data, &device).await?;
    let test = if args.id.is_none() {
        Some(report::evaluate_best(&population, &readable, &bench).await?)
    } else {
        population.test_result(&readable.individual.id).await?
    };
    let exported = export::write(
        &gathered,
        &readable,
        test.as_ref(),
        Some(bench.normalization()),
        &args.out,
    )
    .await?;
    let individual = readable.individual;
    println!(
        "individual   {} validation {:.4}{}",
        individual.id,
        individual.fitness(),
        test.map(|t| format!(
            ", test {:.4} ({} of {})",
            t.test_accuracy, t.correct, t.total
        ))
        .unwrap_or_default()
    );
    for file in &exported.files {
        println!("wrote        {}", file.display());
    }
    Ok(())
}
