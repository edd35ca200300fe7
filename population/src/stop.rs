//! When an experiment ends: the stop conditions of its spec, the store's stop marker that
//! tells every worker, and the flag that one process's loops poll between and during
//! trainings. The operator and the workers decide the same way because they share this code.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::individual::now_ms;
use crate::store::{ExperimentRecord, Population, StoreError};

/// Set once, by whoever first sees that the experiment should end; polled between and during
/// trainings.
#[derive(Debug, Default)]
pub struct StopFlag {
    stopped: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl StopFlag {
    pub fn stop(&self, reason: &str) {
        if let Ok(mut r) = self.reason.lock() {
            r.get_or_insert_with(|| reason.to_string());
        }
        self.stopped.store(true, Ordering::SeqCst);
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    pub fn reason(&self) -> Option<String> {
        self.reason.lock().ok().and_then(|r| r.clone())
    }
}

/// Why the experiment should stop now, if it should: the stop marker, or one of the spec's
/// stop conditions.
pub async fn stop_reason(
    population: &Population,
    record: &ExperimentRecord,
) -> Result<Option<String>, StoreError> {
    if let Some(marker) = population.stop_marker().await? {
        return Ok(Some(marker.reason));
    }
    // The stop conditions may have been edited since this process read the record (the
    // operator rewrites them when spec.stop changes): the stored ones decide.
    let current = population.experiment().await?;
    let stop = current
        .as_ref()
        .map(|r| &r.spec.stop)
        .unwrap_or(&record.spec.stop);
    conditions_met(population, stop, record.created_at_ms).await
}

/// Which of `stop`'s conditions is met, for an experiment created at `created_at_ms`, when
/// the caller knows the current stop conditions (the operator, which just recorded them) and
/// has checked the stop marker.
pub async fn conditions_met(
    population: &Population,
    stop: &crds::StopSpec,
    created_at_ms: u64,
) -> Result<Option<String>, StoreError> {
    if let Some(wall) = stop
        .wall_time
        .as_deref()
        .and_then(|w| crds::parse_duration(w).ok())
    {
        let elapsed = now_ms().saturating_sub(created_at_ms);
        if elapsed >= wall.as_millis() as u64 {
            return Ok(Some(format!(
                "wall time of {} reached",
                stop.wall_time.as_deref().unwrap_or_default()
            )));
        }
    }
    if stop.individuals_trained.is_none() && stop.target_validation_accuracy.is_none() {
        return Ok(None);
    }
    let summary = population.summary().await?;
    if let Some(n) = stop.individuals_trained {
        if summary.trained >= n {
            return Ok(Some(format!("{} individuals trained", summary.trained)));
        }
    }
    if let (Some(target), Some(best)) = (stop.target_validation_accuracy, &summary.best) {
        if best.fitness >= target {
            return Ok(Some(format!(
                "validation accuracy {:.4} reached the target {target}",
                best.fitness
            )));
        }
    }
    Ok(None)
}

/// Polls the store every `interval` and sets `flag` (and the store's stop marker) when the
/// experiment should end. Returns when the flag is set, by it or by anyone else.
pub async fn watch_for_stop(
    population: Population,
    record: ExperimentRecord,
    flag: Arc<StopFlag>,
    interval: Duration,
) {
    while !flag.is_stopped() {
        match stop_reason(&population, &record).await {
            Ok(Some(reason)) => {
                if let Err(e) = population.request_stop(&reason).await {
                    tracing::warn!(error = %e, "cannot write the stop marker");
                }
                tracing::info!(experiment = %record.name, reason = %reason, "stopping");
                flag.stop(&reason);
                return;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot check the stop conditions"),
        }
        let deadline = Instant::now() + interval;
        while Instant::now() < deadline && !flag.is_stopped() {
            tokio::time::sleep(Duration::from_millis(100).min(interval)).await;
        }
    }
}

/// [`watch_for_stop`] as a task of its own, on clones of what it watches.
pub fn spawn_watch(
    population: &Population,
    record: &ExperimentRecord,
    flag: &Arc<StopFlag>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(watch_for_stop(
        population.clone(),
        record.clone(),
        flag.clone(),
        interval,
    ))
}
