//! Prometheus metrics: reconciles, their errors and durations, and per-experiment gauges
//! (population, individuals trained, best validation accuracy, failed and replaced workers,
//! whether the store was reached, whether it is running), what the chart's dashboard draws
//! and its alerts watch (`charts/evolution-operator/monitoring/`).

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
    pub failed_workers: Family<ExperimentLabels, Gauge>,
    pub worker_restarts: Family<ExperimentLabels, Gauge>,
    pub store_reachable: Family<ExperimentLabels, Gauge>,
    pub running: Family<ExperimentLabels, Gauge>,
    pub registry: Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("cambrian");
        let reconciles = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        for kind in crate::Error::KINDS {
            let _ = failures.get_or_create(&ErrorLabels {
                error: kind.to_string(),
            });
        }
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let population = Family::<ExperimentLabels, Gauge>::default();
        let trained = Family::<ExperimentLabels, Gauge>::default();
        let best = Family::<ExperimentLabels, Gauge<f64, AtomicU64>>::default();
        let failed_workers = Family::<ExperimentLabels, Gauge>::default();
        let worker_restarts = Family::<ExperimentLabels, Gauge>::default();
        let store_reachable = Family::<ExperimentLabels, Gauge>::default();
        let running = Family::<ExperimentLabels, Gauge>::default();
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
        registry.register(
            "experiment_failed_workers",
            "Worker pods that failed, in the current workers Job",
            failed_workers.clone(),
        );
        registry.register(
            "experiment_worker_restarts",
            "Workers Jobs replaced after they gave up",
            worker_restarts.clone(),
        );
        registry.register(
            "experiment_store_reachable",
            "1 if the last status refresh read the experiment's store, 0 if it failed",
            store_reachable.clone(),
        );
        registry.register(
            "experiment_running",
            "1 while the experiment is in phase Running (its workers should be training)",
            running.clone(),
        );
        Self {
            reconciles,
            failures,
            duration,
            population,
            trained,
            best_validation_accuracy: best,
            failed_workers,
            worker_restarts,
            store_reachable,
            running,
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

    /// The gauges of one experiment after a reconcile; `store_reached` says whether that
    /// reconcile read its store.
    pub fn experiment(
        &self,
        namespace: &str,
        name: &str,
        status: &crds::EvolutionExperimentStatus,
        store_reached: bool,
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
        self.failed_workers
            .get_or_create(&labels)
            .set(i64::from(status.failed_workers.unwrap_or(0)));
        self.worker_restarts
            .get_or_create(&labels)
            .set(i64::from(status.worker_restarts.unwrap_or(0)));
        self.store_reachable
            .get_or_create(&labels)
            .set(i64::from(store_reached));
        self.running
            .get_or_create(&labels)
            .set(i64::from(status.phase == Some(crds::Phase::Running)));
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
        self.failed_workers.remove(&labels);
        self.worker_restarts.remove(&labels);
        self.store_reachable.remove(&labels);
        self.running.remove(&labels);
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
                phase: Some(crds::Phase::Running),
                failed_workers: Some(2),
                ..Default::default()
            },
            false,
        );
        let text = m.render();
        for needle in [
            "cambrian_reconciles_total 1",
            "cambrian_reconcile_errors_total{error=\"store\"} 1",
            "cambrian_reconcile_errors_total{error=\"kube\"} 0",
            "cambrian_reconcile_duration_seconds_count 1",
            "cambrian_experiment_population{namespace=\"ns\",name=\"exp\"} 7",
            "cambrian_experiment_trained{namespace=\"ns\",name=\"exp\"} 12",
            "cambrian_experiment_failed_workers{namespace=\"ns\",name=\"exp\"} 2",
            "cambrian_experiment_worker_restarts{namespace=\"ns\",name=\"exp\"} 0",
            "cambrian_experiment_store_reachable{namespace=\"ns\",name=\"exp\"} 0",
            "cambrian_experiment_running{namespace=\"ns\",name=\"exp\"} 1",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
