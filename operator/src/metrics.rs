//! Prometheus metrics: reconciles, their errors and durations, and per-experiment gauges
//! (population, individuals trained, best validation accuracy).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExperimentLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone)]
pub struct Metrics {
    pub reconciles: Counter,
    pub failures: Family<ErrorLabels, Counter>,
    pub duration: Histogram,
    pub population: Family<ExperimentLabels, Gauge>,
    pub trained: Family<ExperimentLabels, Gauge>,
    pub best_validation_accuracy: Family<ExperimentLabels, Gauge<f64, AtomicU64>>,
    pub registry: Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("cambrian");
        let reconciles = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let population = Family::<ExperimentLabels, Gauge>::default();
        let trained = Family::<ExperimentLabels, Gauge>::default();
        let best = Family::<ExperimentLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "reconciles",
            "Reconciles of EvolutionExperiments",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciles, by kind of error",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time a reconcile took",
            duration.clone(),
        );
        registry.register(
            "experiment_population",
            "Individuals alive",
            population.clone(),
        );
        registry.register(
            "experiment_trained",
            "Individuals trained so far",
            trained.clone(),
        );
        registry.register(
            "experiment_best_validation_accuracy",
            "Validation accuracy of the best individual",
            best.clone(),
        );
        Self {
            reconciles,
            failures,
            duration,
            population,
            trained,
            best_validation_accuracy: best,
            registry: Arc::new(registry),
        }
    }
}

impl Metrics {
    /// Counts a reconcile and times it until the guard drops.
    pub fn count_and_measure(&self) -> ReconcileTimer {
        self.reconciles.inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: self.duration.clone(),
        }
    }

    pub fn failure(&self, kind: &str) {
        self.failures
            .get_or_create(&ErrorLabels {
                error: kind.to_string(),
            })
            .inc();
    }

    pub fn experiment(
        &self,
        namespace: &str,
        name: &str,
        status: &crds::EvolutionExperimentStatus,
    ) {
        let labels = ExperimentLabels {
            namespace: namespace.into(),
            name: name.into(),
        };
        if let Some(p) = status.population {
            self.population.get_or_create(&labels).set(i64::from(p));
        }
        if let Some(t) = status.trained {
            self.trained.get_or_create(&labels).set(t as i64);
        }
        if let Some(best) = &status.best {
            self.best_validation_accuracy
                .get_or_create(&labels)
                .set(best.validation_accuracy);
        }
    }

    /// Removes an experiment's gauges once it is gone.
    pub fn forget(&self, namespace: &str, name: &str) {
        let labels = ExperimentLabels {
            namespace: namespace.into(),
            name: name.into(),
        };
        self.population.remove(&labels);
        self.trained.remove(&labels);
        self.best_validation_accuracy.remove(&labels);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }
}

/// Records the reconcile's duration when dropped, however the reconcile ends.
pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histogram_and_gauges() {
        let m = Metrics::default();
        drop(m.count_and_measure());
        m.failure("store");
        m.experiment(
            "ns",
            "exp",
            &crds::EvolutionExperimentStatus {
                population: Some(7),
                trained: Some(12),
                ..Default::default()
            },
        );
        let text = m.render();
        for needle in [
            "cambrian_reconciles_total 1",
            "cambrian_reconcile_errors_total{error=\"store\"} 1",
            "cambrian_reconcile_duration_seconds_count 1",
            "cambrian_experiment_population{namespace=\"ns\",name=\"exp\"} 7",
            "cambrian_experiment_trained{namespace=\"ns\",name=\"exp\"} 12",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
