//! The exit statuses the operator's Jobs act on (`podFailurePolicy`): 78 for a configuration
//! no retry can fix, so that the Job fails at once instead of burning pods.

use std::process::Command;

fn worker(experiment: &str, device: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .arg("worker")
        .env_clear()
        .env("CAMBRIAN_EXPERIMENT", experiment)
        .env("CAMBRIAN_DEVICE", device)
        .env("HOSTNAME", "exit.codes-0")
        .output()
        .expect("the trainer runs")
}

#[test]
fn an_experiment_that_does_not_parse_is_a_configuration_error() {
    let out = worker("{ not json", "cpu");
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("CAMBRIAN_EXPERIMENT"));
}

#[test]
fn a_device_this_machine_lacks_is_a_configuration_error() {
    let store = tempfile::tempdir().unwrap();
    let experiment = serde_json::json!({
        "apiVersion": "cambrian.dev/v1alpha1",
        "kind": "EvolutionExperiment",
        "metadata": { "name": "exit-codes" },
        "spec": { "population": 4, "store": { "url": format!("file://{}", store.path().display()) } },
    });
    let out = worker(&experiment.to_string(), "cuda:7");
    assert_eq!(out.status.code(), Some(78), "{out:?}");
}
