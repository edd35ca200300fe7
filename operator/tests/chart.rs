//! The Helm chart and the manifests the operator writes, checked with the real tools: the
//! committed CRD is the generated one; `helm lint` and `helm template` pass; everything
//! rendered, and the Jobs the operator creates, pass `kubernetes-validate --strict`.
//!
//! The tools are fetched on first use into `target/test-tools/`: helm by
//! `cambrian_tests::tools`, and kubernetes-validate from PyPI.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use cambrian_tests::tools::{helm, run, tools};

const KUBERNETES_VERSION: &str = "1.33.0";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> PathBuf {
    repo().join("charts/evolution-operator")
}

fn kubernetes_validate() -> &'static Path {
    static TOOL: OnceLock<PathBuf> = OnceLock::new();
    TOOL.get_or_init(|| {
        let venv = tools().join("validate-venv");
        let tool = venv.join("bin/kubernetes-validate");
        if !tool.exists() {
            run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
            run(Command::new(venv.join("bin/pip")).args(["install", "-q", "kubernetes-validate"]));
        }
        tool
    })
}

fn validate(files: &[&Path]) {
    let mut cmd = Command::new(kubernetes_validate());
    cmd.args(["--strict", "-k", KUBERNETES_VERSION]);
    for f in files {
        cmd.arg(f);
    }
    let out = run(&mut cmd);
    assert!(!out.contains("ERROR") && !out.contains("WARN"), "{out}");
}

#[test]
fn committed_crd_is_the_generated_one() {
    let committed =
        std::fs::read_to_string(chart().join("crds/evolutionexperiments.yaml")).unwrap();
    assert!(
        committed == operator::crd_yaml(),
        "charts/evolution-operator/crds/evolutionexperiments.yaml is stale: run\n  cargo run -p operator --bin crdgen > charts/evolution-operator/crds/evolutionexperiments.yaml"
    );
    // Structural: nothing may pass unchecked.
    assert!(!committed.contains("x-kubernetes-preserve-unknown-fields"));
    assert!(committed.contains("x-kubernetes-validations"));
}

#[test]
fn chart_lints_renders_and_validates() {
    let dir = tempfile::tempdir().unwrap();
    for (name, sets) in [
        ("default", vec![]),
        ("ha", vec!["replicaCount=2"]),
        (
            "no-secrets",
            vec!["rbac.readSecrets=false", "metrics.service.enabled=false"],
        ),
    ] {
        let mut lint = Command::new(helm());
        lint.arg("lint").arg("--strict").arg(chart());
        for s in &sets {
            lint.args(["--set", s]);
        }
        run(&mut lint);
        let mut template = Command::new(helm());
        template
            .args(["template", "evolution", "--namespace", "cambrian"])
            .arg(chart());
        for s in &sets {
            template.args(["--set", s]);
        }
        let rendered = run(&mut template);
        if name == "ha" {
            assert!(rendered.contains("leases"), "leader election RBAC");
            assert!(rendered.contains("CAMBRIAN_LEADER_ELECTION\n              value: \"true\""));
        }
        if name == "no-secrets" {
            assert!(
                !rendered.contains("secrets"),
                "no Secret access when not needed"
            );
        }
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, rendered).unwrap();
        validate(&[&path]);
    }
    validate(&[&chart().join("crds/evolutionexperiments.yaml")]);
    // The values schema rejects what it should.
    let out = Command::new(helm())
        .args(["template", "x"])
        .arg(chart())
        .args(["--set", "replicaCount=0"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "replicaCount=0 accepted");
}

#[test]
fn jobs_the_operator_creates_validate() {
    let dir = tempfile::tempdir().unwrap();
    let experiment = crds::manifest::load(&repo().join("examples/cifar10.yaml")).unwrap();
    let mut exp = crds::EvolutionExperiment::new(&experiment.name, experiment.spec.into_inner());
    exp.metadata.namespace = Some("research".into());
    exp.metadata.uid = Some("0d1c6f0e-7a0e-4b8e-9c59-2f1f8d1a9a10".into());
    let settings = operator::jobs::JobSettings::default();
    let mut paths = Vec::new();
    for (name, job) in [
        (
            "workers",
            operator::jobs::workers(&exp, &settings, false, Default::default()),
        ),
        ("evaluation", operator::jobs::evaluation(&exp, &settings)),
    ] {
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, serde_norway::to_string(&job).unwrap()).unwrap();
        paths.push(path);
    }
    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    validate(&refs);
}
