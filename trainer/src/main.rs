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
    /// Write the best individual (or any, by id) as an ONNX model beside its DNA and weights,
    /// with pictures of its network and its lineage.
    Export(cli::export::Args),
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
            eprintln!("Error: {}", message(&error));
            match error.downcast_ref::<cli::Exit>() {
                Some(exit) => ExitCode::from(exit.code()),
                None => ExitCode::FAILURE,
            }
        }
    }
}

/// The error and its causes, each said once: a context that already quotes its cause (as
/// most of ours do, to read well on its own) is not followed by the same words again.
fn message(error: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Logs to standard error through `tracing-indicatif`, so that a progress bar (see
/// `cli::progress`) stays at the bottom with log lines printed above it.
fn init_logging() {
    use tracing_indicatif::filter::{hide_indicatif_span_fields, IndicatifFilter};
    use tracing_indicatif::IndicatifLayer;
    use tracing_subscriber::fmt::format::DefaultFields;
    use tracing_subscriber::layer::{Layer, SubscriberExt};
    use tracing_subscriber::util::SubscriberInitExt;
    let indicatif = IndicatifLayer::new()
        .with_span_field_formatter(hide_indicatif_span_fields(DefaultFields::new()));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::registry()
        .with(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .with_writer(indicatif.get_stderr_writer()),
        )
        .with(indicatif.with_filter(IndicatifFilter::new(false)))
        .init();
}

fn command() -> Result<()> {
    init_logging();
    cli::memory::keep_step_buffers();
    match Cli::parse().command {
        Command::Run(args) => cli::block_on(cli::run::run(args)),
        Command::Worker(args) => cli::block_on(cli::worker::run(args)),
        Command::Report(args) => cli::block_on(cli::report::run(args)),
        Command::Export(args) => cli::block_on(cli::export::run(args)),
        Command::Evaluate(args) => cli::block_on(cli::evaluate::run(args)),
        Command::Intervene(args) => cli::block_on(cli::intervene::run(args)),
        Command::Study(args) => cli::block_on(cli::study::run(args)),
        Command::Train(args) => cli::train::run(args),
        Command::Mutate(args) => cli::mutate::run(args),
        Command::Bench(args) => cli::bench::run(args),
        Command::CheckOps(args) => cli::check_ops::run(args),
    }
}
