//! What a run shows while it runs, read from the store's totals once a second. On a terminal,
//! a progress bar at the bottom (individuals trained, individuals per minute, best validation
//! accuracy, budget left) with the few lines worth reading above it: each new best, warnings
//! (log lines go through the bar, `tracing-indicatif`). Off a terminal (a CI log, `kubectl
//! logs`) a bar would be noise: one summary line per interval instead, and each new best.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressStyle;
use population::stop::StopFlag;
use population::store::{ExperimentRecord, Population};
use tracing::Instrument;
use tracing_indicatif::span_ext::IndicatifSpanExt;

/// How progress is shown.
#[derive(Clone, Copy, Debug)]
pub enum Display {
    /// A bar at the bottom of the terminal.
    Bar,
    /// A summary line every `every`.
    Lines { every: Duration },
}

impl Display {
    /// The bar where standard error is a terminal, else a line every `every`.
    pub fn for_stderr(every: Duration) -> Self {
        if std::io::stderr().is_terminal() {
            Display::Bar
        } else {
            Display::Lines { every }
        }
    }
}

/// Shows progress until `stop` is set, then clears the bar.
pub async fn show(
    population: Population,
    record: ExperimentRecord,
    stop: Arc<StopFlag>,
    display: Display,
) {
    // Only the bar's span gets a progress bar from `tracing-indicatif`.
    let span = match display {
        Display::Bar => tracing::info_span!("progress", indicatif.pb_show = tracing::field::Empty),
        Display::Lines { .. } => tracing::info_span!("progress"),
    };
    if matches!(display, Display::Bar) {
        span.pb_set_style(
            &ProgressStyle::with_template("{spinner} {elapsed_precise} [{bar:20}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
    }
    watch(population, record, stop, display, span.clone())
        .instrument(span)
        .await
}

async fn watch(
    population: Population,
    record: ExperimentRecord,
    stop: Arc<StopFlag>,
    display: Display,
    span: tracing::Span,
) {
    let spec = &record.spec.stop;
    let wall = spec
        .wall_time
        .as_deref()
        .and_then(|w| crds::parse_duration(w).ok());
    let by_count = spec.individuals_trained.is_some();
    if let Display::Bar = display {
        match (spec.individuals_trained, wall) {
            (Some(n), _) => span.pb_set_length(n),
            (None, Some(w)) => span.pb_set_length(w.as_secs()),
            (None, None) => {}
        }
    }
    let started = Instant::now();
    let created = std::time::UNIX_EPOCH + Duration::from_millis(record.created_at_ms);
    let mut first_trained = None;
    let mut best: Option<f64> = None;
    let mut last_line = Instant::now();
    loop {
        // One last reading after the stop: the run's final totals and best.
        let stopping = stop.is_stopped();
        if let Ok(summary) = population.summary().await {
            let elapsed = created.elapsed().unwrap_or(started.elapsed());
            let left = match (wall, spec.individuals_trained) {
                (Some(w), _) => {
                    let s = w.saturating_sub(elapsed).as_secs();
                    format!("{}m{:02}s left", s / 60, s % 60)
                }
                (None, Some(n)) => format!("{} left", n.saturating_sub(summary.trained)),
                (None, None) => String::new(),
            };
            // The rate of this run, not of the store's whole history (a resumed run).
            let since = *first_trained.get_or_insert(summary.trained);
            let minutes = started.elapsed().as_secs_f64() / 60.0;
            let per_minute = if minutes > 0.05 {
                summary.trained.saturating_sub(since) as f64 / minutes
            } else {
                0.0
            };
            let best_now = summary.best.as_ref().map(|b| b.fitness);
            if let (Some(now), Some(entry)) = (best_now, &summary.best) {
                if best.is_none_or(|b| now > b) {
                    tracing::info!(
                        experiment = %record.name,
                        id = %entry.id,
                        validation_accuracy = now,
                        trained = summary.trained,
                        "new best"
                    );
                    best = Some(now);
                }
            }
            let best_text = best_now.map_or("-".to_string(), |b| format!("{:.2}%", 100.0 * b));
            match display {
                Display::Bar => {
                    span.pb_set_position(if by_count {
                        summary.trained
                    } else {
                        elapsed.as_secs()
                    });
                    span.pb_set_message(&format!(
                        "{} trained, {per_minute:.0}/min, {} alive, best {best_text}, {left}",
                        summary.trained, summary.alive
                    ));
                }
                Display::Lines { every } => {
                    if stopping || last_line.elapsed() + Duration::from_millis(200) >= every {
                        last_line = Instant::now();
                        tracing::info!(
                            experiment = %record.name,
                            trained = summary.trained,
                            per_minute = %format!("{per_minute:.1}"),
                            alive = summary.alive,
                            best_validation = %best_text,
                            left = %left,
                            "progress"
                        );
                    }
                }
            }
        }
        if stopping {
            break;
        }
        // The bar moves every second; lines read the store once per line (a pod's two LISTs
        // a second would be traffic for nothing).
        let ticks = match display {
            Display::Bar => 10,
            Display::Lines { every } => (every.as_millis() / 100).max(1),
        };
        for _ in 0..ticks {
            if stop.is_stopped() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
