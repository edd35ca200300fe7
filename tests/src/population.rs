//! Populations filled directly through the store, for status tests and benchmarks that need
//! many individuals but no training.

use bytes::Bytes;
use trainer::dna::Dna;
use trainer::individual::{now_ms, Individual, IndividualId, Lineage, Outcome, FORMAT_VERSION};
use trainer::store::{Population, ProgressEntry};

pub fn individual(fitness: f64) -> Individual {
    let dna = Dna::initial();
    Individual {
        format_version: FORMAT_VERSION,
        id: IndividualId::new(),
        lineage: Lineage {
            parent: None,
            slot: None,
            mutations: vec![],
            seed: 0,
            worker: "fill".into(),
            inherited_tensors: 0,
            fresh_tensors: 0,
        },
        outcome: Outcome {
            validation_accuracy: fitness,
            validation_correct: 0,
            validation_total: 5000,
            steps: 0,
            diverged: false,
            first_loss: None,
            last_loss: None,
            flops: 1e12,
            parameters: 30730,
            convolutions: dna.convolution_count(),
            training_seconds: 10.0,
            evaluation_seconds: 1.0,
            overhead_seconds: 0.1,
            tf32: false,
            device: "cpu".into(),
        },
        dna,
        started_at_ms: now_ms(),
        born_at_ms: now_ms(),
    }
}

/// `alive` individuals (fitness spread over [0, 0.9)) and the progress keys of `workers`
/// workers, written 16 at a time.
pub async fn fill(population: &Population, alive: usize, workers: usize) {
    let mut tasks = Vec::new();
    for chunk in 0..16 {
        let population = population.clone();
        tasks.push(tokio::spawn(async move {
            for i in (chunk..alive).step_by(16) {
                let fitness = 0.9 * i as f64 / alive as f64;
                population
                    .add(&individual(fitness), Bytes::from_static(b"weights"))
                    .await
                    .expect("add");
            }
        }));
    }
    for t in tasks {
        t.await.expect("fill task");
    }
    for w in 0..workers {
        let entry = ProgressEntry {
            worker: format!("worker-{w}"),
            trained: 10,
            flops: 1e13,
            seconds: 100.0,
            best: None,
        };
        population
            .record_progress(&entry, None)
            .await
            .expect("progress");
    }
}
