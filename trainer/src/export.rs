//! An individual written out for use outside cambrian: its DNA, weights and record (what
//! cambrian reads back), an ONNX model (what any runtime reads), and pictures of its network
//! and its lineage (what a person reads).

use std::path::{Path, PathBuf};

use crate::data::Normalization;
use crate::onnx::{self, Metadata};
use crate::pictures::architecture::{self, Heading};
use crate::pictures::lineage::Lineage;
use crate::report::{self, Gathered, Readable, ReportError};
use population::dna::ModelSpec;
use population::store::TestResult;

/// What an export wrote.
#[derive(Debug)]
pub struct Exported {
    pub dir: PathBuf,
    /// `model.onnx`, written where the training split's normalisation was known.
    pub onnx: Option<PathBuf>,
    pub files: Vec<PathBuf>,
}

/// Writes `readable` into `dir`: `dna.json`, `weights.safetensors`, `individual.json`,
/// `architecture.svg`, `lineage.svg`, `lineage.txt`, and `model.onnx` when `normalization`
/// (the experiment's, from its training split) is given: without it the model's input
/// contract would be unknown.
pub async fn write(
    g: &Gathered,
    readable: &Readable<'_>,
    test: Option<&TestResult>,
    normalization: Option<&Normalization>,
    dir: &Path,
) -> Result<Exported, ReportError> {
    report::export_best(readable, test, dir).await?;
    let individual = readable.individual;
    let test = test.filter(|t| t.id == individual.id);
    let write = |name: &str, bytes: &[u8]| -> Result<PathBuf, ReportError> {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| ReportError::Write {
            path: path.clone(),
            message: e.to_string(),
        })?;
        Ok(path)
    };
    let mut files: Vec<PathBuf> = ["dna.json", "weights.safetensors", "individual.json"]
        .iter()
        .map(|f| dir.join(f))
        .collect();
    let spec = ModelSpec::cifar(g.record.spec.data.dataset.classes());
    let mut lines = vec![format!(
        "{} · {} · validation {:.2}%{}",
        g.record.name,
        g.record.spec.data.dataset.as_str(),
        100.0 * individual.fitness(),
        test.map(|t| format!(" · test {:.2}%", 100.0 * t.test_accuracy))
            .unwrap_or_default()
    )];
    lines.push(format!(
        "learning rate {:.4}, born {:.1} min into the experiment",
        individual.dna.learning_rate,
        individual.born_at_ms.saturating_sub(g.record.created_at_ms) as f64 / 60_000.0
    ));
    let heading = Heading {
        title: format!("individual {}", individual.id),
        lines,
        parameters: individual.outcome.parameters,
    };
    files.push(write(
        "architecture.svg",
        architecture::svg(&individual.dna, spec, &heading).as_bytes(),
    )?);
    let lineage = Lineage::of(individual, &g.individuals);
    let title = format!(
        "lineage of {} ({} generations)",
        individual.id,
        lineage.chain.len().saturating_sub(1)
    );
    files.push(write(
        "lineage.svg",
        lineage.svg(&title, g.record.created_at_ms).as_bytes(),
    )?);
    files.push(write(
        "lineage.txt",
        lineage.text(g.record.created_at_ms).as_bytes(),
    )?);
    let onnx = match normalization {
        Some(normalization) => {
            let model = report::saved_model(&individual.dna, spec.classes, &readable.weights)?;
            let mut metadata = Metadata::default()
                .with("experiment", &g.record.name)
                .with("individual", &individual.id)
                .with("dataset", g.record.spec.data.dataset.as_str())
                .with("validation_accuracy", individual.fitness());
            if let Some(t) = test {
                metadata = metadata.with("test_accuracy", t.test_accuracy);
            }
            let bytes = onnx::export(&model, normalization, &metadata)?;
            let path = write("model.onnx", &bytes)?;
            files.push(path.clone());
            Some(path)
        }
        None => None,
    };
    Ok(Exported {
        dir: dir.to_path_buf(),
        onnx,
        files,
    })
}
