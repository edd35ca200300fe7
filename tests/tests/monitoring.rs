//! The chart's alerts and dashboard against a real Prometheus (Debian's package): the rules
//! load and pass their unit tests (`tests/monitoring/rules_test.yaml`), and what the chart
//! renders is exactly the files tested. Prometheus scraping a running operator, where every
//! dashboard query returns series, is in `cluster.rs`, which has the operator.

use std::process::Command;

use cambrian_tests::cluster::repo;
use cambrian_tests::prometheus::promtool;
use cambrian_tests::tools::{helm, run};

fn rules() -> std::path::PathBuf {
    repo().join("charts/evolution-operator/monitoring/rules.yaml")
}

#[test]
fn promtool_checks_the_rules_and_passes_their_unit_tests() {
    let out = run(Command::new(promtool())
        .args(["check", "rules"])
        .arg(rules()));
    assert!(out.contains("SUCCESS: 3 rules found"), "{out}");
    let out = run(Command::new(promtool())
        .args(["test", "rules"])
        .arg(repo().join("tests/monitoring/rules_test.yaml")));
    assert!(out.contains("SUCCESS"), "{out}");
}

/// The rendered PrometheusRule and dashboard ConfigMap carry the files above unchanged, and
/// neither is rendered unless asked for.
#[test]
fn the_chart_ships_the_tested_rules_and_dashboard_when_asked() {
    let render = |sets: &[&str]| {
        let mut cmd = Command::new(helm());
        cmd.args(["template", "evolution"])
            .arg(repo().join("charts/evolution-operator"));
        for set in sets {
            cmd.args(["--set", set]);
        }
        run(&mut cmd)
    };
    let plain = render(&[]);
    assert!(!plain.contains("kind: PrometheusRule") && !plain.contains("grafana_dashboard"));
    let text = render(&[
        "prometheusRule.enabled=true",
        "prometheusRule.labels.release=kps",
        "grafana.dashboard.enabled=true",
    ]);
    let documents: Vec<serde_json::Value> = text
        .split("\n---")
        .filter_map(|d| serde_norway::from_str::<serde_json::Value>(d).ok())
        .filter(|d| d.is_object())
        .collect();
    let find = |kind: &str| {
        documents
            .iter()
            .find(|d| {
                d["kind"] == kind
                    && d["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("evolution"))
                    && (kind != "ConfigMap" || d["metadata"]["labels"]["grafana_dashboard"] == "1")
            })
            .unwrap_or_else(|| panic!("no {kind} in\n{text}"))
    };
    let rule = find("PrometheusRule");
    assert_eq!(rule["metadata"]["labels"]["release"], "kps");
    let shipped: serde_json::Value =
        serde_norway::from_str(&std::fs::read_to_string(rules()).unwrap()).unwrap();
    assert_eq!(rule["spec"], shipped);
    let dashboard = find("ConfigMap");
    let json = dashboard["data"]["cambrian-experiments.json"]
        .as_str()
        .unwrap();
    let file =
        std::fs::read_to_string(repo().join("charts/evolution-operator/monitoring/dashboard.json"))
            .unwrap();
    let (a, b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(json).unwrap(),
        serde_json::from_str(&file).unwrap(),
    );
    assert_eq!(a, b);
    let panels = b["panels"].as_array().unwrap();
    assert_eq!(panels.len(), 8);
}
