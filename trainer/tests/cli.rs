//! The binary as a user meets it: a local run end to end, and bad input.

use std::process::Command;

use crds::Dataset;
use trainer::data::fixture;

fn trainer() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trainer"));
    cmd.env("RUST_LOG", "warn");
    cmd
}

#[test]
fn local_run_trains_reports_exports_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    fixture::write(&data, Dataset::Cifar10, 30, 1).unwrap();
    let store = dir.path().join("store");
    let out = dir.path().join("out");
    let manifest = dir.path().join("run.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: cambrian.dev/v1alpha1\nkind: EvolutionExperiment\nmetadata:\n  name: smoke\nspec:\n  population: 4\n  workers: 2\n  training:\n    steps: 20\n    batchSize: 10\n    momentum: 0.9\n    weightDecay: 0.0001\n    initialLearningRate: 0.02\n  store:\n    url: file://{}\n  stop:\n    individualsTrained: 12\n",
            store.display()
        ),
    )
    .unwrap();
    let output = trainer()
        .env("RUST_LOG", "info")
        .arg("run")
        .arg(&manifest)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("individuals trained"), "{stdout}");
    assert!(stdout.contains("test "), "no test accuracy in:\n{stdout}");
    for file in [
        "progress.svg",
        "best/dna.json",
        "best/weights.safetensors",
        "best/individual.json",
        "best/model.onnx",
        "best/architecture.svg",
        "best/lineage.svg",
        "best/lineage.txt",
    ] {
        assert!(out.join(file).exists(), "{file} missing");
    }
    let architecture = std::fs::read_to_string(out.join("best/architecture.svg")).unwrap();
    assert!(architecture.contains("fully connected") && architecture.contains("input"));
    let lineage = std::fs::read_to_string(out.join("best/lineage.txt")).unwrap();
    assert!(lineage.contains("initial individual"), "{lineage}");
    // Births are debug lines; off a terminal a run logs each new best (and a summary line
    // every 30 s), not every birth.
    assert!(!stderr.contains("individual born"), "{stderr}");
    assert!(stderr.contains("new best"), "{stderr}");
    // The summary line the run ends with, in plain values.
    assert!(stderr.contains("alive=4 best_validation="), "{stderr}");
    assert!(
        !stderr.contains("\u{1b}["),
        "colour codes off a terminal: {stderr}"
    );
    let svg = std::fs::read_to_string(out.join("progress.svg")).unwrap();
    assert!(svg.contains("<circle"), "no individuals drawn");
    let dna = population::dna::Dna::load(&out.join("best/dna.json")).unwrap();
    dna.validate().unwrap();

    // `report` reads the same store afterwards and finds the recorded test accuracy.
    let output = trainer()
        .arg("report")
        .arg(format!("file://{}", store.display()))
        .arg("--out")
        .arg(dir.path().join("again"))
        .output()
        .unwrap();
    let again = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{again}");
    assert!(again.contains("best"), "{again}");
    // Exactly the twelve trainings asked for, and all four places filled at the end.
    assert!(again.contains("12 trained, 4 alive"), "{again}");

    // `export` writes any individual: the best by default, another by id, and names an
    // unknown one.
    let url = format!("file://{}", store.display());
    let export = |extra: &[&str], to: &std::path::Path| {
        trainer()
            .arg("export")
            .arg(&url)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(to)
            .args(extra)
            .output()
            .unwrap()
    };
    let output = export(&[], &dir.path().join("export"));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains("model.onnx") && text.contains("test "),
        "{text}"
    );
    let best: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("export/individual.json")).unwrap(),
    )
    .unwrap();
    let other = std::fs::read_dir(store.join("individuals"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|id| {
            best["id"] != id.as_str()
                && store
                    .join("individuals")
                    .join(id)
                    .join("weights.safetensors")
                    .exists()
        })
        .expect("another individual with weights");
    let output = export(&["--id", &other], &dir.path().join("other"));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(dir.path().join("other/model.onnx").exists());
    let output = export(&["--id", "1a2b3c4d5e6-00000000"], &dir.path().join("none"));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no record of individual 1a2b3c4d5e6-00000000"),
        "{stderr}"
    );

    // Run again: it says what stopped it and how to go on, and trains nothing.
    let run = |manifest: &std::path::Path| {
        trainer()
            .arg("run")
            .arg(manifest)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let output = run(&manifest);
    let second = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{second}");
    assert!(
        second.contains("already stopped: 12 individuals trained"),
        "{second}"
    );
    assert!(second.contains("raise the stop condition"), "{second}");
    assert!(second.contains("12 trained, 4 alive"), "{second}");
    // Raise the stop condition: it goes on, to exactly the new count.
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replace("individualsTrained: 12", "individualsTrained: 16"),
    )
    .unwrap();
    let output = run(&manifest);
    let third = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{third}");
    assert!(third.contains("it goes on"), "{third}");
    assert!(third.contains("16 trained, 4 alive"), "{third}");
}

#[test]
fn bad_manifest_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("bad.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: cambrian.dev/v1alpha1\nkind: EvolutionExperiment\nmetadata:\n  name: bad\nspec:\n  population: 10\n  workers: 20\n  store:\n    url: file:///tmp/x\n",
    )
    .unwrap();
    let output = trainer().arg("run").arg(&manifest).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("spec.workers") && stderr.contains("bad.yaml"),
        "{stderr}"
    );
    // Said once: a context that quotes its cause is not followed by the cause again.
    assert_eq!(stderr.matches("spec.workers").count(), 1, "{stderr}");
}

#[test]
fn missing_data_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let dna = dir.path().join("dna.json");
    std::fs::write(&dna, population::dna::Dna::initial().to_json()).unwrap();
    let output = trainer()
        .arg("train")
        .arg(&dna)
        .arg("--data")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("data_batch_1.bin") && stderr.contains("does not exist"),
        "{stderr}"
    );
}

#[test]
fn a_study_of_two_arms_and_two_seeds_makes_its_table_and_figures() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    fixture::write(&data, Dataset::Cifar10, 30, 1).unwrap();
    std::fs::write(
        dir.path().join("base.yaml"),
        "apiVersion: cambrian.dev/v1alpha1\nkind: EvolutionExperiment\nmetadata:\n  name: base\nspec:\n  population: 3\n  workers: 1\n  training:\n    steps: 5\n    batchSize: 10\n    initialLearningRate: 0.02\n  store:\n    url: file:///replaced/by/the/study\n  stop:\n    individualsTrained: 7\n",
    )
    .unwrap();
    let study = dir.path().join("study.yaml");
    std::fs::write(
        &study,
        "name: tiny\nbase: base.yaml\nseeds: [1, 2]\narms:\n  - name: evolution\n  - name: random-search\n    set: {controls: {selection: none}}\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let run = |aggregate: bool| {
        let mut cmd = trainer();
        cmd.arg("study")
            .arg(&study)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .args(["--cores", "2", "--parallel", "2"]);
        if aggregate {
            cmd.arg("--aggregate");
        }
        let output = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).to_string();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stdout}\n{stderr}");
        stdout
    };
    let stdout = run(false);
    assert!(stdout.contains("| evolution | 2 |"), "{stdout}");
    let csv = std::fs::read_to_string(out.join("table.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 3, "{csv}");
    assert!(rows[1].starts_with("evolution,2,") && rows[2].starts_with("random-search,2,"));
    for figure in [
        "figure2-time.svg",
        "figure2-flops.svg",
        "figure3.svg",
        "figure4-evolution.svg",
        "figure4-random-search.svg",
    ] {
        let svg = std::fs::read_to_string(out.join(figure)).unwrap();
        assert!(svg.contains("<svg"), "{figure}");
    }
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let runs = results.as_array().unwrap();
    assert_eq!(runs.len(), 4);
    for r in runs {
        assert_eq!(r["individuals"], 7, "{r}");
        let best = r["best_so_far"].as_array().unwrap();
        assert!(!best.is_empty());
        // Every best-so-far was measured on the test set, and the result recorded.
        for b in best {
            assert!(b["test"].is_f64(), "{b}");
            let store = out.join(format!(
                "runs/{}/seed-{}/store/evaluation",
                r["arm"].as_str().unwrap(),
                r["seed"]
            ));
            let recorded = std::fs::read_dir(&store).unwrap().count();
            assert!(recorded >= best.len(), "{}", store.display());
        }
    }
    // Repeats share the validation split: each run's records name the same validation size,
    // and aggregating again reads the recorded results and agrees.
    let again = run(true);
    assert!(again.contains("| evolution | 2 |"), "{again}");
    let after = std::fs::read_to_string(out.join("table.csv")).unwrap();
    assert_eq!(after, csv, "the same measurements twice");
}
