//! The binary's commands, one module each: its arguments (`Args`) and what it does (`run`).
//! Flags several commands share are in [`flags`].

pub mod bench;
pub mod check_ops;
pub mod evaluate;
pub mod flags;
pub mod memory;
pub mod mutate;
pub mod progress;
pub mod report;
pub mod run;
pub mod train;
pub mod worker;

use std::path::PathBuf;

use anyhow::{Context, Result};
use crds::ValidatedSpec;
use trainer::data::{source, Split};

/// Runs an asynchronous command on a multi-threaded runtime of its own.
pub fn block_on(command: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(command)
}

/// An experiment's data folder (`given`, else its source fetched into the cache) and the
/// training/validation split loaded from it, off the runtime's threads.
pub async fn training_data(
    spec: &ValidatedSpec,
    given: Option<PathBuf>,
) -> Result<(PathBuf, Split)> {
    let dir = source::folder(spec, given).await?;
    let (spec, at) = (spec.clone(), dir.clone());
    let split = tokio::task::spawn_blocking(move || Split::for_spec(&spec, &at))
        .await?
        .context("loading the training data")?;
    Ok((dir, split))
}

/// Four hex digits that keep the names of workers started under one name apart.
pub fn random_suffix() -> String {
    format!("{:04x}", rand::random::<u16>())
}
