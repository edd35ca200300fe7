//! The binary's commands, one module each: its arguments (`Args`) and what it does (`run`).
//! Flags several commands share are in [`flags`].

pub mod bench;
pub mod check_ops;
pub mod evaluate;
pub mod export;
pub mod flags;
pub mod intervene;
pub mod memory;
pub mod mutate;
pub mod progress;
pub mod report;
pub mod run;
pub mod study;
pub mod train;
pub mod worker;

use std::path::PathBuf;

use anyhow::{Context, Result};
use crds::ValidatedSpec;
use trainer::data::{source, Split};

/// How a pod's command ended, when its controller should act on it: the operator's Jobs fail
/// at once on a configuration error (no retry can fix it), and replace a worker that was
/// terminated before the experiment stopped (a drain, a preemption, a deleted pod).
#[derive(Debug, thiserror::Error)]
pub enum Exit {
    #[error("configuration error (exit 78): {0:#}")]
    Configuration(anyhow::Error),
    #[error("terminated before the experiment stopped (exit 143); the Job starts a replacement")]
    Terminated,
}

impl Exit {
    /// `EX_CONFIG` from sysexits.h, and 128 + SIGTERM as a shell reports it.
    pub fn code(&self) -> u8 {
        match self {
            Exit::Configuration(_) => 78,
            Exit::Terminated => 143,
        }
    }
}

/// A worker name made of what store keys allow: pod names may hold dots and upper case.
pub fn worker_name(base: &str) -> String {
    let name: String = base
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = name.trim_matches('-');
    let name = &name[..name.len().min(50)];
    let name = name.trim_end_matches('-');
    if name.is_empty() {
        "worker".into()
    } else {
        name.into()
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names_become_worker_names() {
        assert_eq!(worker_name("exp.v2-workers-abcde"), "exp-v2-workers-abcde");
        assert_eq!(worker_name("A_B"), "a-b");
        assert_eq!(worker_name("..."), "worker");
        let long = worker_name(&format!("{}.x", "a".repeat(70)));
        assert!(long.len() <= 50);
        population::store::check_worker_name(&format!("{long}-0000")).unwrap();
    }
}
