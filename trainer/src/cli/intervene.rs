//! `trainer intervene STORE`: §5's interventions on a running experiment, from anywhere that
//! reaches its store (a local run's folder, or a cluster's bucket): every worker sees them
//! within one reproduction, and every child born after says so in its record.

use anyhow::{bail, Result};
use clap::Args as ClapArgs;
use population::store::{Change, Interventions};

use super::flags::S3Flags;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// s3://bucket/prefix or file:///path
    store: String,
    #[command(flatten)]
    s3: S3Flags,
    /// Mutations per reproduction from now on (§5 raises it to 5 for a while).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    mutation_rate: Option<u32>,
    /// Retrain every alive individual's DNA from fresh weights before tournaments compare
    /// it again.
    #[arg(long)]
    reset_weights: bool,
    /// Only list the interventions so far.
    #[arg(long)]
    list: bool,
}

pub async fn run(args: Args) -> Result<()> {
    let population = args.s3.open(&args.store).await?;
    let Some(record) = population.experiment().await? else {
        bail!(
            "{} holds no experiment; start one with trainer run first",
            population.url()
        );
    };
    let mut changes = Vec::new();
    if let Some(rate) = args.mutation_rate {
        changes.push(Change::MutationRate { rate });
    }
    if args.reset_weights {
        changes.push(Change::ResetWeights);
    }
    if changes.is_empty() && !args.list {
        bail!("nothing to do: give --mutation-rate N, --reset-weights or --list");
    }
    for change in changes {
        let done = population.intervene(change, "command").await?;
        println!("recorded: {}", describe(&done.change));
    }
    let known = population.interventions().await?;
    print_state(&known, record.spec.mutation_rate);
    Ok(())
}

fn describe(change: &Change) -> String {
    match change {
        Change::MutationRate { rate } => format!("mutation rate {rate}"),
        Change::ResetWeights => "weight reset".into(),
    }
}

fn print_state(known: &Interventions, base: u32) {
    for i in known.in_order() {
        println!("  {} ({}): {}", i.at_ms, i.source, describe(&i.change));
    }
    println!(
        "now: mutation rate {}, reset epoch {}",
        known.mutation_rate(base),
        known.epoch()
    );
}
