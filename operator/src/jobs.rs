//! The Jobs an experiment runs: the long-lived workers (an Indexed Job, one index per worker
//! pod, each running `trainer worker` until the store's stop marker) and the one-off final
//! evaluation.

use std::collections::BTreeMap;

use crds::EvolutionExperiment;
use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnExitCodesRequirement,
    PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, PodSecurityContext,
    PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

/// Operator-wide settings for the Jobs it makes.
#[derive(Clone, Debug)]
pub struct JobSettings {
    /// Trainer image when the experiment names none.
    pub trainer_image: String,
    /// Failed worker pods a Job tolerates before it gives up; the operator then starts a new
    /// one, so this only bounds how often that happens.
    pub worker_backoff_limit: i32,
    /// GPUs (`nvidia.com/gpu`) each trainer pod asks for when its experiment sets no
    /// resources; 0 for none.
    pub default_gpus: u32,
}

impl Default for JobSettings {
    fn default() -> Self {
        Self {
            trainer_image: "ghcr.io/cambrian-dev/trainer:latest".into(),
            worker_backoff_limit: 100,
            default_gpus: 0,
        }
    }
}

const CACHE: &str = "/var/cache/cambrian";
const UID: i64 = 65532;

/// Exit status of a trainer that cannot run as configured (`EX_CONFIG`): the Job fails at
/// once instead of burning pods on retries that cannot succeed.
pub const CONFIGURATION_EXIT: i32 = 78;
/// Annotation holding a hash of the pod template the Job was made with. A Job's template is
/// immutable, so a different hash means the Job must be replaced, not patched.
pub const TEMPLATE_HASH: &str = "cambrian.dev/template-hash";
/// Annotations carrying the history of the workers Jobs this one replaced: how many, and how
/// many pods failed in them, so that the counts survive the replacement.
pub const RESTARTS: &str = "cambrian.dev/restarts";
pub const FAILED_BEFORE: &str = "cambrian.dev/failed-before";

fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

/// A name `<experiment>-<suffix>` that fits where the Job controller puts it: the Job's
/// `job-name` label on its pods (63 characters) with room for the pods' own suffix, and an
/// Indexed Job's pod host names (`<job>-<index>`), which are DNS labels: no dots. Long names
/// are cut, dots become '-', and then a hash of the experiment's name keeps apart the names
/// that would meet (`a.b` and `a-b`); the cut never leaves a `-` next to the hash, which DNS
/// names forbid.
pub fn job_name(experiment: &str, suffix: &str) -> String {
    let full = format!("{experiment}-{suffix}");
    if full.len() <= 52 && !experiment.contains('.') {
        return full;
    }
    let label = experiment.replace('.', "-");
    let prefix = label[..label.len().min(30)].trim_end_matches('-');
    format!("{prefix}-{:06x}-{suffix}", fnv(experiment) & 0xff_ffff)
}

/// A label value naming the experiment: its name when that fits in a label value (63
/// characters), else a cut of it with a hash. Experiment names may be 253 long.
pub fn label_value(name: &str) -> String {
    if name.len() <= 63 {
        return name.to_string();
    }
    let prefix = name[..54].trim_end_matches(['.', '-']);
    format!("{prefix}-{:08x}", fnv(name) & 0xffff_ffff)
}

pub fn workers_name(exp: &EvolutionExperiment) -> String {
    job_name(&exp.name_any(), "workers")
}

pub fn evaluation_name(exp: &EvolutionExperiment) -> String {
    job_name(&exp.name_any(), "evaluation")
}

fn labels(exp: &EvolutionExperiment, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "cambrian-trainer".into()),
        ("app.kubernetes.io/component".into(), component.into()),
        ("app.kubernetes.io/managed-by".into(), crate::MANAGER.into()),
        (
            "cambrian.dev/experiment".into(),
            label_value(&exp.name_any()),
        ),
    ])
}

/// The part of the spec a trainer needs and that never changes while the experiment runs.
/// What may change (workers, suspension, stop conditions, the mutation rate and the
/// interventions' schedules, how pods run) stays out, so that editing it leaves the pod
/// template, which a Job cannot change, as it was: workers read those from the store's
/// record, which the operator writes before any Job exists and keeps following the spec.
pub fn trainer_spec(spec: &crds::EvolutionExperimentSpec) -> crds::EvolutionExperimentSpec {
    let unchanging = crds::EvolutionExperimentSpec {
        workers: None,
        suspend: false,
        worker: crds::WorkerSpec::default(),
        ..spec.clone()
    };
    let defaults = crds::EvolutionExperimentSpec {
        stop: crds::StopSpec::default(),
        mutation_rate: 1,
        mutation_schedule: Vec::new(),
        weight_resets: Vec::new(),
        ..spec.clone()
    };
    unchanging.with_edits_of(&defaults)
}

/// The environment every trainer pod gets: the experiment itself (its unchanging spec, never
/// credentials), and the store's credentials by reference to the Secret.
fn environment(exp: &EvolutionExperiment) -> Vec<EnvVar> {
    let experiment = serde_json::json!({
        "apiVersion": crds::manifest::API_VERSION,
        "kind": crds::manifest::KIND,
        "metadata": { "name": exp.name_any() },
        "spec": trainer_spec(&exp.spec),
    });
    let mut env = vec![
        EnvVar {
            name: "CAMBRIAN_EXPERIMENT".into(),
            value: Some(experiment.to_string()),
            ..EnvVar::default()
        },
        EnvVar {
            name: "CAMBRIAN_CACHE".into(),
            value: Some(CACHE.into()),
            ..EnvVar::default()
        },
        EnvVar {
            name: "CAMBRIAN_DEVICE".into(),
            value: Some(
                exp.spec
                    .worker
                    .device
                    .clone()
                    .unwrap_or_else(|| "auto".into()),
            ),
            ..EnvVar::default()
        },
        EnvVar {
            name: "CAMBRIAN_WORKER_LOOPS".into(),
            value: Some(exp.spec.workers_per_pod().to_string()),
            ..EnvVar::default()
        },
    ];
    if let Some(secret) = &exp.spec.store.credentials_secret {
        for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
            env.push(EnvVar {
                name: key.into(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: secret.clone(),
                        key: key.into(),
                        optional: Some(false),
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            });
        }
    }
    env
}

/// One GPU (or the operator's default count) when the experiment asks for nothing.
fn default_resources(settings: &JobSettings) -> Option<ResourceRequirements> {
    (settings.default_gpus > 0).then(|| {
        let gpus = BTreeMap::from([(
            "nvidia.com/gpu".to_string(),
            Quantity(settings.default_gpus.to_string()),
        )]);
        ResourceRequirements {
            limits: Some(gpus.clone()),
            requests: Some(gpus),
            ..ResourceRequirements::default()
        }
    })
}

fn pod(
    exp: &EvolutionExperiment,
    settings: &JobSettings,
    args: Vec<String>,
    component: &str,
) -> PodTemplateSpec {
    let worker = &exp.spec.worker;
    let container = Container {
        name: "trainer".into(),
        image: Some(
            worker
                .image
                .clone()
                .unwrap_or_else(|| settings.trainer_image.clone()),
        ),
        command: Some(vec!["trainer".into()]),
        args: Some(args),
        env: Some(environment(exp)),
        resources: worker
            .resources
            .clone()
            .or_else(|| default_resources(settings)),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(UID),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "cache".into(),
                mount_path: CACHE.into(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "tmp".into(),
                mount_path: "/tmp".into(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(exp, component)),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            restart_policy: Some("Never".into()),
            node_selector: worker.node_selector.clone(),
            tolerations: worker.tolerations.clone(),
            automount_service_account_token: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(UID),
                run_as_group: Some(UID),
                fs_group: Some(UID),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            volumes: Some(vec![
                Volume {
                    name: "cache".into(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Volume::default()
                },
                Volume {
                    name: "tmp".into(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Volume::default()
                },
            ]),
            ..PodSpec::default()
        }),
    }
}

/// Fail the Job at once when the trainer says its configuration is wrong; do not count pods
/// that were evicted or preempted (their condition `DisruptionTarget`) as failures.
fn failure_policy() -> PodFailurePolicy {
    PodFailurePolicy {
        rules: vec![
            PodFailurePolicyRule {
                action: "FailJob".into(),
                on_exit_codes: Some(PodFailurePolicyOnExitCodesRequirement {
                    container_name: Some("trainer".into()),
                    operator: "In".into(),
                    values: vec![CONFIGURATION_EXIT],
                }),
                on_pod_conditions: None,
            },
            PodFailurePolicyRule {
                action: "Ignore".into(),
                on_exit_codes: None,
                on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                    type_: "DisruptionTarget".into(),
                    status: "True".into(),
                }]),
            },
        ],
    }
}

fn job(
    exp: &EvolutionExperiment,
    name: String,
    component: &str,
    mut spec: JobSpec,
    mut annotations: BTreeMap<String, String>,
) -> Job {
    // The completion mode is immutable too: a Job of another mode must be replaced.
    let template = serde_json::to_string(&spec.template).expect("a template serialises")
        + spec.completion_mode.as_deref().unwrap_or("NonIndexed");
    annotations.insert(TEMPLATE_HASH.into(), format!("{:016x}", fnv(&template)));
    spec.pod_failure_policy = Some(failure_policy());
    Job {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: exp.namespace(),
            labels: Some(labels(exp, component)),
            annotations: Some(annotations),
            owner_references: exp.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// The workers Jobs an experiment had before this one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct History {
    /// Workers Jobs replaced after they failed.
    pub restarts: u32,
    /// Pods that failed in them.
    pub failed_before: u32,
}

/// The workers: one pod per `workersPerPod` workers, an Indexed Job with one completion per
/// pod (a pod exits 0 only once the experiment has stopped, and the Job is done when every
/// index is). The completion index is each pod's stable identity: it seeds the pod's workers,
/// so a replaced pod makes the choices its predecessor would have, and a run repeats.
/// Parallelism and completions change together, as an elastic Indexed Job allows. Suspended
/// with the experiment, or once it has stopped and no worker is still finishing.
pub fn workers(
    exp: &EvolutionExperiment,
    settings: &JobSettings,
    suspend: bool,
    history: History,
) -> Job {
    let parallelism = exp.spec.worker_pods() as i32;
    job(
        exp,
        workers_name(exp),
        "workers",
        JobSpec {
            parallelism: Some(parallelism),
            completions: Some(parallelism),
            completion_mode: Some("Indexed".into()),
            backoff_limit: Some(settings.worker_backoff_limit.max(parallelism)),
            suspend: Some(suspend),
            template: pod(exp, settings, vec!["worker".into()], "workers"),
            ..JobSpec::default()
        },
        BTreeMap::from([
            (RESTARTS.into(), history.restarts.to_string()),
            (FAILED_BEFORE.into(), history.failed_before.to_string()),
        ]),
    )
}

/// The final evaluation: test accuracy of the best individual by validation, recorded in the
/// store for the operator to read.
pub fn evaluation(exp: &EvolutionExperiment, settings: &JobSettings) -> Job {
    let mut template = pod(exp, settings, vec!["evaluate".into()], "evaluation");
    if let Some(spec) = template.spec.as_mut() {
        spec.restart_policy = Some("Never".into());
    }
    job(
        exp,
        evaluation_name(exp),
        "evaluation",
        JobSpec {
            parallelism: Some(1),
            completions: Some(1),
            backoff_limit: Some(3),
            template,
            ..JobSpec::default()
        },
        BTreeMap::new(),
    )
}

/// What a Job's status says, in the terms the reconciler needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobState {
    pub exists: bool,
    /// Being deleted: its pods are terminating.
    pub deleting: bool,
    /// Pods not finished: running, pending, or waiting for their configuration.
    pub active: i32,
    /// Pods whose containers run and are ready.
    pub ready: i32,
    pub succeeded: bool,
    pub failed: bool,
    /// Why the Job failed (`BackoffLimitExceeded`, `PodFailurePolicy`), and what it says.
    pub failure: Option<(String, String)>,
    pub failed_pods: i32,
    pub template_hash: Option<String>,
    pub history: History,
}

impl JobState {
    pub fn of(job: Option<&Job>) -> Self {
        let Some(job) = job else {
            return Self::default();
        };
        let status = job.status.clone().unwrap_or_default();
        let condition = |kind: &str| {
            status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == kind && c.status == "True")
        };
        let annotation = |key: &str| job.metadata.annotations.as_ref()?.get(key).cloned();
        let count = |key: &str| annotation(key).and_then(|v| v.parse().ok()).unwrap_or(0);
        let failure = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Failed" && c.status == "True")
            .map(|c| {
                (
                    c.reason.clone().unwrap_or_default(),
                    c.message.clone().unwrap_or_default(),
                )
            });
        Self {
            exists: true,
            deleting: job.metadata.deletion_timestamp.is_some(),
            active: status.active.unwrap_or(0),
            ready: status.ready.unwrap_or(0),
            succeeded: condition("Complete"),
            failed: condition("Failed"),
            failure,
            failed_pods: status.failed.unwrap_or(0),
            template_hash: annotation(TEMPLATE_HASH),
            history: History {
                restarts: count(RESTARTS),
                failed_before: count(FAILED_BEFORE),
            },
        }
    }

    /// The Job failed because its pods reported a configuration error: replacing it would
    /// fail the same way.
    pub fn misconfigured(&self) -> bool {
        self.failure
            .as_ref()
            .is_some_and(|(reason, _)| reason == "PodFailurePolicy")
    }

    /// Pods that failed in this Job and the ones it replaced.
    pub fn failed_total(&self) -> u32 {
        self.history.failed_before + self.failed_pods.max(0) as u32
    }
}

/// The hash `job` was made with.
pub fn template_hash(job: &Job) -> Option<&str> {
    job.metadata
        .annotations
        .as_ref()?
        .get(TEMPLATE_HASH)
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::experiment;

    #[test]
    fn worker_job_runs_locked_down_workers() {
        let mut exp = experiment("paper");
        exp.spec.store.credentials_secret = Some("s3-creds".into());
        let job = workers(&exp, &JobSettings::default(), false, History::default());
        let spec = job.spec.as_ref().unwrap();
        assert_eq!(spec.parallelism, Some(250));
        assert_eq!(spec.completions, Some(250));
        assert_eq!(spec.completion_mode.as_deref(), Some("Indexed"));
        assert_eq!(
            job.metadata.owner_references.as_ref().unwrap()[0].kind,
            "EvolutionExperiment"
        );
        let pod = spec.template.spec.as_ref().unwrap();
        let c = &pod.containers[0];
        assert_eq!(c.args.as_deref(), Some(&["worker".to_string()][..]));
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        let env = c.env.as_ref().unwrap();
        let secret_refs: Vec<_> = env
            .iter()
            .filter_map(|e| e.value_from.as_ref()?.secret_key_ref.as_ref())
            .map(|s| s.name.clone())
            .collect();
        assert_eq!(secret_refs, vec!["s3-creds", "s3-creds"]);
        // The experiment travels as JSON that the worker parses back.
        let json = env
            .iter()
            .find(|e| e.name == "CAMBRIAN_EXPERIMENT")
            .unwrap();
        let back: crds::EvolutionExperiment =
            serde_json::from_str(json.value.as_ref().unwrap()).unwrap();
        assert_eq!(back.spec, trainer_spec(&exp.spec));
        let rules = &spec.pod_failure_policy.as_ref().unwrap().rules;
        assert_eq!(rules[0].action, "FailJob");
        assert_eq!(rules[1].action, "Ignore");
    }

    #[test]
    fn edits_that_jobs_can_take_leave_the_template_alone() {
        let exp = experiment("paper");
        let hash = |exp: &EvolutionExperiment| {
            template_hash(&workers(
                exp,
                &JobSettings::default(),
                false,
                History::default(),
            ))
            .unwrap()
            .to_string()
        };
        let before = hash(&exp);
        let mut edited = exp.clone();
        edited.spec.workers = Some(7);
        edited.spec.suspend = true;
        edited.spec.stop.individuals_trained = Some(5);
        edited.spec.mutation_rate = 5;
        edited.spec.weight_resets = vec![crds::When {
            after: Some("1h".into()),
            trained: None,
        }];
        assert_eq!(
            hash(&edited),
            before,
            "workers, suspend, stop and interventions are not in the template"
        );
        edited.spec.worker.image = Some("ghcr.io/cambrian-dev/trainer:v2".into());
        assert_ne!(hash(&edited), before, "a new image needs a new Job");
    }

    #[test]
    fn label_values_fit() {
        let name = format!("{}.{}", "a".repeat(40), "b".repeat(40));
        let value = label_value(&name);
        assert!(value.len() <= 63, "{value}");
        assert_ne!(
            value,
            label_value(&format!("{}.{}", "a".repeat(40), "c".repeat(40)))
        );
        assert_eq!(label_value("short.name"), "short.name");
        let job = job_name(&format!("{}.{}", "a".repeat(29), "b".repeat(40)), "workers");
        assert!(!job.contains(".-"), "{job}");
        // Pod host names of an Indexed Job are DNS labels: no dots, and `a.b` and `a-b` apart.
        let dotted = job_name("tiny.run-1", "workers");
        assert!(
            !dotted.contains('.') && dotted.starts_with("tiny-run-1-"),
            "{dotted}"
        );
        assert_ne!(dotted, job_name("tiny-run-1", "workers"));
        assert_eq!(job_name("plain", "workers"), "plain-workers");
    }

    #[test]
    fn several_workers_per_pod_and_a_default_gpu() {
        let mut exp = experiment("shared");
        exp.spec.workers = Some(10);
        exp.spec.worker.workers_per_pod = Some(4);
        let settings = JobSettings {
            default_gpus: 1,
            ..JobSettings::default()
        };
        let job = workers(&exp, &settings, false, History::default());
        let spec = job.spec.unwrap();
        assert_eq!(spec.parallelism, Some(3));
        let c = &spec.template.spec.unwrap().containers[0];
        let loops = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == "CAMBRIAN_WORKER_LOOPS")
            .unwrap();
        assert_eq!(loops.value.as_deref(), Some("4"));
        let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits["nvidia.com/gpu"].0, "1");
    }

    #[test]
    fn long_names_stay_valid() {
        let name = job_name(&"x".repeat(63), "evaluation");
        assert!(name.len() <= 52, "{name}");
        assert!(name.ends_with("-evaluation"));
    }
}
