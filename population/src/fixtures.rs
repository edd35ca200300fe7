//! Individuals and populations made without training, for tests and benchmarks of the store,
//! the status and the worker's bookkeeping (the `fixtures` feature; always on in this crate's
//! own tests). One set, so that every crate's tests mean the same thing by "an individual".

use bytes::Bytes;

use crate::dna::Dna;
use crate::individual::{now_ms, Individual, IndividualId, Lineage, Outcome, FORMAT_VERSION};
use crate::store::{Population, ProgressEntry};

/// Parameters of the initial linear model on CIFAR-10: 3,072 inputs times 10 classes, plus 10
/// biases.
pub const LINEAR_PARAMETERS: usize = 30_730;

/// The initial DNA after `mutations` random single mutations drawn from `seed`: networks of
/// every kind (convolutions, skips, both activations) for tests of what reads a DNA.
pub fn evolved_dna(seed: u64, mutations: usize) -> Dna {
    let mut dna = Dna::initial();
    let mut rng = crate::seed::rng(seed, crate::seed::Stream::Mutation);
    for _ in 0..mutations {
        dna = crate::mutation::mutate(&dna, 1, &mut rng).dna;
    }
    dna
}

/// What training `dna` to `fitness` on 100 validation images might have given.
pub fn outcome(fitness: f64, dna: &Dna) -> Outcome {
    Outcome {
        validation_accuracy: fitness,
        validation_correct: (fitness * 100.0).round() as usize,
        validation_total: 100,
        steps: 10,
        diverged: false,
        first_loss: Some(2.3),
        last_loss: Some(1.9),
        flops: 1e9,
        parameters: LINEAR_PARAMETERS,
        convolutions: dna.convolution_count(),
        training_seconds: 1.0,
        evaluation_seconds: 0.1,
        overhead_seconds: 0.01,
        tf32: false,
        device: "cpu".into(),
        failure: None,
    }
}

/// The lineage of an initial individual made by `worker`.
pub fn initial_lineage(worker: &str) -> Lineage {
    Lineage {
        parent: None,
        slot: None,
        mutations: vec![],
        seed: 1,
        worker: worker.into(),
        inherited_tensors: 0,
        fresh_tensors: 2,
        mutation_rate: 1,
        reset_epoch: 0,
        retrained: false,
    }
}

/// An initial (linear) individual with validation accuracy `fitness`, born now.
pub fn individual(fitness: f64) -> Individual {
    let dna = Dna::initial();
    Individual {
        format_version: FORMAT_VERSION,
        id: IndividualId::new(),
        outcome: outcome(fitness, &dna),
        dna,
        lineage: initial_lineage("fixture"),
        started_at_ms: now_ms(),
        born_at_ms: now_ms(),
        kept: false,
    }
}

/// `alive` individuals (fitness spread over [0, 0.9)) and the progress keys of `workers`
/// workers (10 trained each), written 16 at a time.
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

/// The validated spec of the JSON a manifest's `spec` would hold (defaults for the rest).
pub fn spec(json: serde_json::Value) -> crds::ValidatedSpec {
    let spec: crds::EvolutionExperimentSpec = serde_json::from_value(json).expect("a spec");
    crds::validate(&spec).expect("a valid spec")
}
