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

use anyhow::Result;

/// Runs an asynchronous command on a multi-threaded runtime of its own.
pub fn block_on(command: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(command)
}

/// Four hex digits that keep the names of workers started under one name apart.
pub fn random_suffix() -> String {
    format!("{:04x}", rand::random::<u16>())
}
