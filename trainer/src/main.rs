//! `trainer`: one binary for every job of an evolution worker (see the README). Each command
//! is a module of `cli` with its arguments and its `run`.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

mod cli;

#[derive(Parser)]
#[command(
    name = "trainer",
    version,
    about = "Large-scale evolution of image classifiers: the worker"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an experiment on this machine: worker threads, the manifest's store, then a report.
    Run(cli::run::Args),
    /// Run as one trainer pod: worker loops against the experiment's store until it stops.
    Worker(cli::worker::Args),
    /// Summary, best-individual export and progress plot of any store, at any time.
    Report(cli::report::Args),
    /// Measure the best individual by validation on the test set and record it in the store.
    Evaluate(cli::evaluate::Args),
    /// Run a study's arms over its seeds and aggregate them: Figures 2–4 and a table (§4, §5).
    Study(cli::study::Args),
    /// Change the mutation rate or reset every individual's weights in a running experiment
    /// (§5), or list the interventions so far.
    Intervene(cli::intervene::Args),
    /// Train one DNA on CIFAR and report its validation accuracy, FLOPs and wall time.
    Train(cli::train::Args),
    /// Write a mutated child of a parent DNA, for inspection.
    Mutate(cli::mutate::Args),
    /// Training and evaluation images/s of the reference DNAs (optionally against PyTorch).
    Bench(cli::bench::Args),
    /// Check our convolution and batch-norm kernels against Candle's operations on a device:
    /// outputs and gradients on random inputs of varied shapes.
    CheckOps(cli::check_ops::Args),
}

fn main() -> ExitCode {
    match command() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("Error: {error:#}");
            match error.downcast_ref::<cli::Exit>() {
                Some(exit) => ExitCode::from(exit.code()),
                None => ExitCode::FAILURE,
            }
        }
    }
}

fn command() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    cli::memory::keep_step_buffers();
    match Cli::parse().command {
        Command::Run(args) => cli::block_on(cli::run::run(args)),
        Command::Worker(args) => cli::block_on(cli::worker::run(args)),
        Command::Report(args) => cli::block_on(cli::report::run(args)),
        Command::Evaluate(args) => cli::block_on(cli::evaluate::run(args)),
        Command::Intervene(args) => cli::block_on(cli::intervene::run(args)),
        Command::Study(args) => cli::block_on(cli::study::run(args)),
        Command::Train(args) => cli::train::run(args),
        Command::Mutate(args) => cli::mutate::run(args),
        Command::Bench(args) => cli::bench::run(args),
        Command::CheckOps(args) => cli::check_ops::run(args),
    }
}
