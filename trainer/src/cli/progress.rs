//! The local run's progress bar, fed from the store once a second: individuals trained, best
//! validation accuracy, and what is left of the budget.

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use population::stop::StopFlag;
use population::store::{ExperimentRecord, Population};

/// Shows the bar until `stop` is set, then clears it.
pub async fn show(population: Population, record: ExperimentRecord, stop: Arc<StopFlag>) {
    let spec = &record.spec.stop;
    let wall = spec
        .wall_time
        .as_deref()
        .and_then(|w| crds::parse_duration(w).ok());
    let (bar, by_count) = match (spec.individuals_trained, wall) {
        (Some(n), _) => (ProgressBar::new(n), true),
        (None, Some(w)) => (ProgressBar::new(w.as_secs()), false),
        (None, None) => (ProgressBar::new_spinner(), false),
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] [{bar:30}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let started = Instant::now();
    let created = std::time::UNIX_EPOCH + Duration::from_millis(record.created_at_ms);
    while !stop.is_stopped() {
        if let Ok(summary) = population.summary().await {
            let elapsed = created.elapsed().unwrap_or(started.elapsed());
            let left = match (wall, spec.individuals_trained) {
                (Some(w), _) => format!("{}s left", w.saturating_sub(elapsed).as_secs()),
                (None, Some(n)) => format!("{} left", n.saturating_sub(summary.trained)),
                (None, None) => String::new(),
            };
            bar.set_position(if by_count {
                summary.trained
            } else {
                elapsed.as_secs()
            });
            bar.set_message(format!(
                "{} trained, {} alive, best validation {:.4}, {left}",
                summary.trained,
                summary.alive,
                summary.best.map_or(0.0, |b| b.fitness)
            ));
        }
        for _ in 0..10 {
            if stop.is_stopped() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    bar.finish_and_clear();
}
