//! `trainer evaluate`: the operator's final Job. Measures the best individual by validation
//! on the test set, once, and records the result in the store (§3.7).

use anyhow::{bail, Result};
use clap::Args as ClapArgs;
use population::store::{self, Population};
use trainer::data::source;
use trainer::report;

use super::flags::{DataFlag, DeviceFlag, ExperimentFlags, S3Flags};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// s3://bucket/prefix or file:///path; default: the experiment's store.
    store: Option<String>,
    #[command(flatten)]
    s3: S3Flags,
    /// The experiment, as the operator passes it to its evaluation Job.
    #[command(flatten)]
    experiment: ExperimentFlags,
    /// Without a data folder, the experiment's data source is fetched into the cache.
    #[command(flatten)]
    data: DataFlag,
    /// The default device is auto.
    #[command(flatten)]
    device: DeviceFlag,
}

pub async fn run(args: Args) -> Result<()> {
    let (population, data) = match &args.store {
        Some(url) => {
            let Some(data) = args.data.data.clone() else {
                bail!("--data is needed with an explicit store URL");
            };
            (args.s3.open(url).await?, data)
        }
        None => {
            let Some(experiment) = args.experiment.load()? else {
                bail!("name a store URL or set CAMBRIAN_EXPERIMENT");
            };
            let store = store::open(&experiment.spec.store).await?;
            let data = source::folder(&experiment.spec, args.data.data.clone()).await?;
            (Population::new(store), data)
        }
    };
    let device = args.device.open("auto")?;
    let gathered = report::gather(&population).await?;
    let best = report::best_readable(&population, &gathered).await?;
    for (id, why) in &best.skipped {
        eprintln!("skipped {id}, better by validation: {why}");
    }
    let result = match population.test_result(&best.individual.id).await? {
        Some(recorded) => recorded,
        None => {
            let bench =
                report::TestBench::load_async(&gathered.record.spec, &data, &device).await?;
            report::evaluate_best(&population, &best, &bench).await?
        }
    };
    // Only the experiment's final evaluation says which result the experiment reports; a
    // report run midway measures without deciding.
    population.record_reported(&result).await?;
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}
