//! Exported models in an independent runtime: ONNX Runtime (PyPI `onnxruntime`, installed
//! into a virtual environment by the test, with `onnx`, whose checker must accept the file
//! first) runs what `trainer export` writes, and must give
//! cambrian's logits within 1e-4 and exactly its test accuracy: for an evolved best exported
//! from a store, and for grown networks with every kind of layer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use cambrian_tests::experiment::{evolve, spec, trainer};
use cambrian_tests::python;
use candle_core::{DType, Device, Tensor};
use crds::Dataset;
use population::dna::{Dna, ModelSpec};
use population::store::{FileStore, ObjectStore, Population};
use trainer::data::test_set::TestSet;
use trainer::data::{evaluation_batches, fixture, Images, Normalization, Split};
use trainer::model::Model;
use trainer::report::{self, TestBench};
use trainer::{export, onnx};

const RUN: &str = r#"
import json, sys
import numpy as np
import onnx
import onnxruntime as ort

images = np.fromfile(sys.argv[1], dtype=np.float32).reshape(-1, 3, 32, 32)
labels = np.fromfile(sys.argv[2], dtype=np.uint8)
results = {}
for path in sys.argv[3:]:
    # The reference checker, with strict shape inference: a well-formed opset-17 model.
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    expected = np.fromfile(path + ".logits", dtype=np.float32).reshape(len(images), -1)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"images": images})[0]
    # The batch is dynamic: one image, and an odd few, give the same logits.
    one = session.run(["logits"], {"images": images[:1]})[0]
    few = session.run(["logits"], {"images": images[3:10]})[0]
    results[path] = {
        "max_diff": float(np.abs(logits - expected).max()),
        "batch_diff": float(max(np.abs(one - logits[:1]).max(), np.abs(few - logits[3:10]).max())),
        "correct": int((logits.argmax(axis=1) == labels).sum()),
    }
print(json.dumps(results))
"#;

/// Logits `[images, classes]` of `model` on `images`, as cambrian's evaluation computes them,
/// and how many it classifies correctly.
fn cambrian_logits(
    model: &Model,
    images: &Images,
    normalization: &Normalization,
) -> (Vec<f32>, usize) {
    let mut logits = Vec::new();
    let mut correct = 0;
    for batch in evaluation_batches(images, normalization, 50, &Device::Cpu) {
        let batch = batch.unwrap();
        let out = model.forward_t(&batch.images, false).unwrap();
        let predicted = out.argmax(1).unwrap().to_vec1::<u32>().unwrap();
        let labels = batch
            .labels
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        correct += predicted
            .iter()
            .zip(&labels)
            .filter(|(p, l)| p == l)
            .count();
        logits.extend(out.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    (logits, correct)
}

fn write_f32(path: &Path, values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

/// A network of `dna` with fresh weights whose batch-norm statistics have moved.
fn grown_model(dna: &Dna, seed: u64) -> Model {
    let model = Model::fresh(dna, ModelSpec::cifar(10), seed, &Device::Cpu).unwrap();
    for s in 0..2 {
        let x = Tensor::randn(0.2f32, 1., (8, 3, 32, 32), &Device::Cpu).unwrap();
        model
            .forward_t(&x.affine(1.1, s as f64 * 0.1).unwrap(), true)
            .unwrap();
    }
    model
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onnx_runtime_gives_cambrians_logits_and_test_accuracy() {
    let venv = python::venv(
        "onnxruntime-venv",
        &["onnxruntime>=1.17", "onnx", "numpy"],
        "import onnxruntime, onnx, numpy",
    )
    .unwrap_or_else(|e| {
        panic!("cannot install ONNX Runtime for the test ({e}); it needs python3 and PyPI")
    });
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    fixture::write(&data, Dataset::Cifar10, 60, 5).unwrap();

    // An evolved best, exported from its store as `trainer export` does.
    let store = Arc::new(FileStore::open(&dir.path().join("store")).await.unwrap());
    let spec = spec(store.url(), 4, 24);
    let population = Population::new(store);
    let record = population.start_experiment("onnx", &spec).await.unwrap();
    let split = Arc::new(Split::for_spec(&spec, &data).unwrap());
    evolve(&population, &record, trainer(split.clone(), &spec), 2).await;
    let gathered = report::gather(&population).await.unwrap();
    let best = report::best_readable(&population, &gathered).await.unwrap();
    let bench = TestBench::load_async(&record.spec, &data, &Device::Cpu)
        .await
        .unwrap();
    let test = report::evaluate_best(&population, &best, &bench)
        .await
        .unwrap();
    let out = dir.path().join("export");
    let exported = export::write(
        &gathered,
        &best,
        Some(&test),
        Some(bench.normalization()),
        &out,
    )
    .await
    .unwrap();
    let evolved = exported
        .onnx
        .expect("model.onnx with the normalisation known");
    assert_eq!(bench.normalization(), &split.normalization);

    let test_set = TestSet::load(&data, Dataset::Cifar10).unwrap();
    let images = test_set.images_for_reporting();
    let normalization = split.normalization;
    // Each model's logits file, its correct count, and its tolerance: 1e-4 for the trained
    // model; relative to the logits' size for untrained grown networks, whose logits reach
    // tens.
    let mut expected: HashMap<PathBuf, (usize, f64)> = HashMap::new();
    let model = report::saved_model(&best.individual.dna, 10, &best.weights).unwrap();
    let (logits, correct) = cambrian_logits(&model, images, &normalization);
    assert_eq!(correct, test.correct, "the test accuracy cambrian recorded");
    write_f32(&evolved.with_extension("onnx.logits"), &logits);
    expected.insert(evolved.clone(), (correct, 1e-4));

    // Grown networks: convolutions of every stride and filter size, skips that resize, pad
    // and truncate, linear and batch-norm vertices.
    for seed in 0..5 {
        let dna = population::fixtures::evolved_dna(seed, 30);
        let model = grown_model(&dna, seed);
        let path = dir.path().join(format!("grown-{seed}.onnx"));
        let bytes = onnx::export(&model, &normalization, &onnx::Metadata::default()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        let (logits, correct) = cambrian_logits(&model, images, &normalization);
        write_f32(&path.with_extension("onnx.logits"), &logits);
        let scale = logits.iter().fold(1f32, |m, v| m.max(v.abs())) as f64;
        expected.insert(path, (correct, 1e-4 * scale));
    }

    // The images as the model's contract says: RGB pixel / 255, NCHW.
    let pixels: Vec<f32> = (0..images.len())
        .flat_map(|i| images.image(i).iter().map(|&b| b as f32 / 255.0))
        .collect();
    let labels: Vec<u8> = images.iter().map(|(_, label)| label as u8).collect();
    write_f32(&dir.path().join("images.f32"), &pixels);
    std::fs::write(dir.path().join("labels.u8"), &labels).unwrap();
    let output = Command::new(venv.join("bin/python"))
        .args(["-c", RUN])
        .arg(dir.path().join("images.f32"))
        .arg(dir.path().join("labels.u8"))
        .args(expected.keys())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: HashMap<String, serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    for (path, (correct, tolerance)) in &expected {
        let r = &results[&path.display().to_string()];
        let diff = r["max_diff"].as_f64().unwrap();
        eprintln!(
            "{}: max |Δlogit| {diff:.2e} (tolerance {tolerance:.1e}), {} of {} correct",
            path.display(),
            r["correct"],
            images.len()
        );
        assert!(
            diff < *tolerance,
            "{}: logits differ by {diff}",
            path.display()
        );
        assert!(
            r["batch_diff"].as_f64().unwrap() < *tolerance,
            "{}: batch size changes logits",
            path.display()
        );
        assert_eq!(
            r["correct"].as_u64().unwrap() as usize,
            *correct,
            "{}: accuracy",
            path.display()
        );
    }
}
