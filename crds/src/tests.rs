use kube::CustomResourceExt;

use super::manifest::parse;
use super::*;

const MINIMAL: &str = r#"
apiVersion: cambrian.dev/v1alpha1
kind: EvolutionExperiment
metadata:
  name: paper
spec:
  store:
    url: s3://evolution/runs/paper
"#;

#[test]
fn defaults_are_the_papers() {
    let e = parse("minimal.yaml", MINIMAL).unwrap();
    let s = &e.spec;
    assert_eq!(s.population, 1000);
    assert_eq!(s.workers(), 250);
    assert_eq!(s.mutation_rate, 1);
    assert_eq!(s.training.steps, 25_600);
    assert_eq!(s.training.batch_size, 50);
    assert_eq!(s.training.momentum, 0.9);
    assert_eq!(s.training.weight_decay, 1e-4);
    assert_eq!(s.training.initial_learning_rate, 0.1);
    assert_eq!(s.data.dataset, Dataset::Cifar10);
    assert_eq!(s.controls.selection, Selection::Tournament);
    assert!(s.controls.weight_inheritance);
    assert_eq!(s.store.retention, Retention::Retain);
}

fn error_of(extra: &str) -> String {
    let text = format!("{MINIMAL}{extra}");
    parse("bad.yaml", &text).unwrap_err().to_string()
}

#[test]
fn bad_fields_are_named() {
    let cases = [
        ("  population: 1\n", "spec.population"),
        ("  population: 10\n  workers: 11\n", "spec.workers"),
        ("  mutationRate: 0\n", "spec.mutationRate"),
        ("  training:\n    steps: 0\n", "spec.training.steps"),
        ("  stop:\n    wallTime: soon\n", "spec.stop.wallTime"),
        (
            "  stop:\n    targetValidationAccuracy: 1.5\n",
            "spec.stop.targetValidationAccuracy",
        ),
        (
            "  data:\n    validationImages: 60000\n",
            "spec.data.validationImages",
        ),
        ("  data:\n    sha256: abc\n", "spec.data.sha256"),
        ("  worker:\n    device: tpu\n", "spec.worker.device"),
        (
            "  mutationSchedule:\n    - {after: 10m, trained: 5, rate: 5}\n",
            "spec.mutationSchedule[0]",
        ),
        (
            "  mutationSchedule:\n    - {after: soon, rate: 5}\n",
            "spec.mutationSchedule[0].after",
        ),
        (
            "  mutationSchedule:\n    - {trained: 9, rate: 0}\n",
            "spec.mutationSchedule[0].rate",
        ),
        ("  weightResets:\n    - {}\n", "spec.weightResets[0]"),
        (
            "  population: 4\n  controls:\n    sampleSize: 5\n",
            "spec.controls.sampleSize",
        ),
    ];
    for (extra, field) in cases {
        let msg = error_of(extra);
        assert!(
            msg.contains(field) && msg.contains("bad.yaml"),
            "{field}: {msg}"
        );
    }
}

#[test]
fn a_manifest_names_only_what_it_changes() {
    let e = parse(
        "partial.yaml",
        &format!("{MINIMAL}  training:\n    steps: 256\n"),
    )
    .unwrap();
    assert_eq!(e.spec.training.steps, 256);
    assert_eq!(e.spec.training.batch_size, 50);
    assert!(!e.spec.training.tf32);
}

#[test]
fn schedules_and_aging_parse() {
    let e = parse(
        "s.yaml",
        &format!(
            "{MINIMAL}  mutationSchedule:\n    - {{after: 20m, rate: 5}}\n    - {{trained: 300, rate: 1}}\n  weightResets:\n    - {{after: 30m}}\n  controls:\n    selection: aging\n    sampleSize: 4\n"
        ),
    )
    .unwrap();
    assert_eq!(e.spec.mutation_schedule[0].rate, 5);
    assert_eq!(e.spec.mutation_schedule[1].when().tag(), "trained-300");
    assert_eq!(e.spec.weight_resets[0].tag(), "after-30m");
    let minute = std::time::Duration::from_secs(60);
    assert!(!e.spec.weight_resets[0].reached(29 * minute, 1000));
    assert!(e.spec.weight_resets[0].reached(30 * minute, 0));
    assert!(e.spec.mutation_schedule[1].when().reached(minute, 300));
    assert_eq!(e.spec.controls.selection, Selection::Aging);
    assert_eq!(e.spec.controls.sample_size, 4);
}

#[test]
fn unknown_and_mistyped_fields_are_rejected() {
    let msg = error_of("  populaton: 10\n");
    assert!(msg.contains("populaton"), "{msg}");
    let msg = error_of("  population: many\n");
    assert!(
        msg.contains("population") || msg.contains("invalid type"),
        "{msg}"
    );
    let msg = parse("x.yaml", "kind: Deployment\napiVersion: apps/v1\n")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("EvolutionExperiment"), "{msg}");
}

#[test]
fn store_urls_cannot_escape_their_prefix() {
    assert_eq!(
        parse_store_url("s3://my-bucket/a/b/").unwrap(),
        StoreLocation::S3 {
            bucket: "my-bucket".into(),
            prefix: "a/b".into()
        }
    );
    assert_eq!(
        parse_store_url("file:///data/run-1").unwrap(),
        StoreLocation::File {
            path: "/data/run-1".into()
        }
    );
    for bad in [
        "s3://my-bucket/a/../b",
        "s3://My_Bucket/x",
        "file://relative/path",
        "file:///data/../etc",
        "gs://bucket/x",
        "s3://bucket/a//b",
    ] {
        assert!(parse_store_url(bad).is_err(), "{bad} accepted");
    }
    let text = MINIMAL.replace("s3://evolution/runs/paper", "s3://evolution/../other");
    let msg = parse("bad.yaml", &text).unwrap_err().to_string();
    assert!(msg.contains("spec.store.url"), "{msg}");
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("10m").unwrap().as_secs(), 600);
    assert_eq!(parse_duration("1d 2h").unwrap().as_secs(), 93_600);
    assert!(parse_duration("ten minutes").is_err());
}

#[test]
fn crd_has_status_short_name_and_columns() {
    let crd = EvolutionExperiment::crd();
    assert_eq!(crd.spec.group, "cambrian.dev");
    assert_eq!(crd.spec.names.short_names, Some(vec!["evo".to_string()]));
    let version = &crd.spec.versions[0];
    assert!(version.subresources.as_ref().unwrap().status.is_some());
    let columns: Vec<String> = version
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(
        columns,
        [
            "Phase",
            "Workers",
            "Population",
            "Trained",
            "Best-Val",
            "Test",
            "Age"
        ]
    );
}

#[test]
fn every_example_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            super::manifest::load(&path).unwrap_or_else(|e| panic!("{e}"));
            count += 1;
        }
    }
    assert!(count >= 5, "examples found: {count}");
}
