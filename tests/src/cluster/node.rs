//! A test node: a small stand-in for the kubelet, so that a control plane with no scheduler,
//! no kubelet and no container runtime still runs pods. Each container runs as a local process
//! of an executable built by the tests (the "image"), in its own process group, with the
//! environment, volumes and credentials a kubelet would give it, and pod status is written
//! back the way the kubelet writes it, so that the Job and Deployment controllers (and the
//! operator watching them) see pods start, finish, fail, restart and be deleted as they would
//! in a real cluster.
//!
//! What it leaves out, on purpose: probes (a running container is ready), resource limits,
//! security contexts, networking (every pod shares loopback; `env_overrides` is how tests keep
//! pods from clashing on ports), image pulls, and every volume kind but `emptyDir` and the
//! service account token.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    Binding, ConfigMap, Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, HostIP, Node, NodeAddress, NodeCondition, NodeSpec,
    NodeStatus, NodeSystemInfo, ObjectReference, Pod, PodCondition, PodIP, PodStatus,
    ResourceFieldSelector, Secret, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::Client;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// The address every pod and the node itself have: there is no per-pod network.
const LOOPBACK: &str = "127.0.0.1";
/// How often the node's Ready condition is refreshed. Nothing in the test control plane
/// marks a silent node NotReady (no node lifecycle controller), but a real heartbeat keeps
/// `kubectl get nodes` and anything reading the condition honest.
const HEARTBEAT: Duration = Duration::from_secs(10);
/// Back-off before a container that exited is started again. The kubelet starts at 10 s and
/// doubles; tests want restarts to be seen quickly.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);
/// Retry interval for a container whose Secret or ConfigMap is missing, as the kubelet does
/// (it re-syncs the pod every few seconds).
const CONFIG_RETRY: Duration = Duration::from_secs(2);
/// Retry interval for an image the node has no executables for.
const IMAGE_RETRY: Duration = Duration::from_secs(5);
/// Bound on the API calls made to start one container, so that a hung API server cannot wedge
/// a pod's task (it would stop reacting to deletion).
const PREPARE_TIMEOUT: Duration = Duration::from_secs(20);

/// What the test node is and where its containers come from.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Node object name, e.g. "cambrian-test-node".
    pub name: String,
    /// image name without tag/digest (e.g. "ghcr.io/cambrian-dev/trainer") -> folder holding its
    /// executables. An entry also serves every image below it ("ghcr.io/cambrian-dev" serves
    /// ".../trainer" and ".../operator"); the longest matching entry wins.
    pub images: Vec<(String, PathBuf)>,
    /// Per-pod folders go under `work_dir/<namespace>/<pod>/`.
    pub work_dir: PathBuf,
    /// API server URL for in-pod kubeconfigs, e.g. `https://127.0.0.1:PORT`.
    pub server: String,
    /// Cluster CA certificate (PEM) for in-pod kubeconfigs.
    pub ca_pem: Vec<u8>,
    /// Env vars set in every container after the pod's own: the stand-in for per-pod
    /// networking, since all pods share loopback (e.g. `CAMBRIAN_HTTP_ADDRESS=127.0.0.1:0`).
    pub env_overrides: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("preparing the node's work folder {}: {source}", path.display())]
    WorkDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("registering node {node}: {source}")]
    Register {
        node: String,
        #[source]
        source: kube::Error,
    },
}

/// A running test node. Dropping it (or [`TestNode::shutdown`]) kills every process it
/// started, so a failing test leaves no stray trainers behind.
pub struct TestNode {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

/// What the node's tasks share.
struct Shared {
    client: Client,
    config: NodeConfig,
    /// Process groups started and not yet reaped: what Drop must kill, since tasks that are
    /// aborted never get to.
    groups: Mutex<HashSet<i32>>,
}

impl Shared {
    fn groups(&self) -> MutexGuard<'_, HashSet<i32>> {
        // A panic elsewhere must not stop the node from killing its processes.
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pod_dir(&self, namespace: &str, pod: &str) -> PathBuf {
        self.config.work_dir.join(namespace).join(pod)
    }
}

impl TestNode {
    /// Registers the Node (replacing a leftover one of the same name) and starts serving
    /// pods. Fails only if the Node cannot be registered: after that, API errors are retried.
    pub async fn start(client: Client, config: NodeConfig) -> Result<TestNode, NodeError> {
        std::fs::create_dir_all(&config.work_dir).map_err(|source| NodeError::WorkDir {
            path: config.work_dir.clone(),
            source,
        })?;
        let shared = Arc::new(Shared {
            client,
            config,
            groups: Mutex::new(HashSet::new()),
        });
        let registered = Time(Timestamp::now());
        register(&shared, &registered)
            .await
            .map_err(|source| NodeError::Register {
                node: shared.config.name.clone(),
                source,
            })?;
        let heartbeat = tokio::spawn(heartbeat(shared.clone(), registered));
        let pods = tokio::spawn(PodWatch::new(shared.clone()).run());
        Ok(TestNode {
            shared,
            tasks: vec![heartbeat, pods],
        })
    }

    /// The stdout+stderr log of a pod's container, as written so far ("" if none). Restarts
    /// of the container append to the same log.
    pub fn log(&self, namespace: &str, pod: &str, container: &str) -> String {
        let path = self
            .shared
            .pod_dir(namespace, pod)
            .join(format!("{container}.log"));
        std::fs::read(path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// Kills every process (SIGKILL) and stops the node's tasks; also done on Drop. Pods are
    /// left as they are in the API: the node just goes silent, as a crashed kubelet would.
    pub async fn shutdown(mut self) {
        self.kill_everything();
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }

    fn kill_everything(&self) {
        for task in &self.tasks {
            task.abort();
        }
        for group in self.shared.groups().drain() {
            kill_group(group, libc::SIGKILL);
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill_everything();
    }
}

/// Sends `signal` to a whole process group, so that whatever a container's process started
/// gets it too, as everything in a real container's PID namespace would.
fn kill_group(group: i32, signal: i32) {
    // Group 0 is our own and -1 would be every process we may signal: never send those.
    if group > 1 {
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        unsafe {
            libc::kill(-group, signal);
        }
    }
}

fn log(namespace: &str, pod: &str, message: impl std::fmt::Display) {
    eprintln!("[test-node] {namespace}/{pod}: {message}");
}

fn api_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The Node object.

fn node_labels(name: &str) -> BTreeMap<String, String> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), name.to_string()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), arch.to_string()),
    ])
}

/// Creates the Node, or takes over one left by an earlier run. A leftover is patched rather
/// than deleted and recreated: deleting a Node makes the pod garbage collector delete every
/// pod bound to it.
async fn register(shared: &Shared, registered: &Time) -> Result<(), kube::Error> {
    let name = &shared.config.name;
    let nodes: Api<Node> = Api::all(shared.client.clone());
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(node_labels(name)),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec::default()),
        status: None,
    };
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(e) if api_code(&e) == Some(409) => {
            let patch = serde_json::json!({
                "metadata": { "labels": node_labels(name) },
                "spec": { "taints": null, "unschedulable": null },
            });
            nodes
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        Err(e) => return Err(e),
    }
    write_node_status(shared, registered).await
}

async fn heartbeat(shared: Arc<Shared>, registered: Time) {
    let mut ticks = tokio::time::interval(HEARTBEAT);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate, and registration just wrote the status
    loop {
        ticks.tick().await;
        if let Err(e) = write_node_status(&shared, &registered).await {
            eprintln!(
                "[test-node] node {}: heartbeat failed: {e}",
                shared.config.name
            );
        }
    }
}

async fn write_node_status(shared: &Shared, registered: &Time) -> Result<(), kube::Error> {
    let now = Time(Timestamp::now());
    let condition = |type_: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(registered.clone()),
    };
    let resources = BTreeMap::from([
        ("cpu".to_string(), Quantity("16".into())),
        ("memory".to_string(), Quantity("64Gi".into())),
        ("pods".to_string(), Quantity("110".into())),
    ]);
    let status = NodeStatus {
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: LOOPBACK.into(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: shared.config.name.clone(),
            },
        ]),
        allocatable: Some(resources.clone()),
        capacity: Some(resources),
        conditions: Some(vec![
            condition(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
            ),
            condition(
                "DiskPressure",
                "False",
                "KubeletHasNoDiskPressure",
                "kubelet has no disk pressure",
            ),
            condition(
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "kubelet has sufficient PID available",
            ),
            condition(
                "Ready",
                "True",
                "KubeletReady",
                "cambrian test node is posting ready status",
            ),
        ]),
        node_info: Some(NodeSystemInfo {
            architecture: node_labels("")
                .remove("kubernetes.io/arch")
                .unwrap_or_default(),
            operating_system: "linux".into(),
            os_image: "cambrian test node".into(),
            kernel_version: "local".into(),
            container_runtime_version: "cambrian-test-node://0".into(),
            kubelet_version: "v0.0.0-cambrian-test-node".into(),
            kube_proxy_version: String::new(),
            boot_id: String::new(),
            machine_id: String::new(),
            system_uuid: String::new(),
            swap: None,
        }),
        ..NodeStatus::default()
    };
    let nodes: Api<Node> = Api::all(shared.client.clone());
    let patch = serde_json::json!({ "status": status });
    nodes
        .patch_status(
            &shared.config.name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map(|_| ())
}

// ---------------------------------------------------------------------------------------------
// Watching pods: binding unscheduled ones, handing ours to one task each.

/// The pod watch and the per-pod tasks it feeds. The tasks live in a JoinSet owned by the
/// watch task, so aborting that one task stops them all.
struct PodWatch {
    shared: Arc<Shared>,
    /// Our pods by uid: the latest object, or None once it is gone.
    pods: HashMap<String, watch::Sender<Option<Arc<Pod>>>>,
    /// Unscheduled pods a binding task has been started for.
    binding: HashSet<String>,
    /// Uids seen during a re-list: pods missing from it were deleted while the watch was
    /// down, and the watcher reports no Delete for those.
    relisted: Option<HashSet<String>>,
    tasks: JoinSet<()>,
}

impl PodWatch {
    fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            pods: HashMap::new(),
            binding: HashSet::new(),
            relisted: None,
            tasks: JoinSet::new(),
        }
    }

    async fn run(mut self) {
        let api: Api<Pod> = Api::all(self.shared.client.clone());
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(event) = events.next().await {
            while self.tasks.try_join_next().is_some() {}
            match event {
                Ok(watcher::Event::Apply(pod)) => self.apply(pod),
                Ok(watcher::Event::InitApply(pod)) => {
                    if let (Some(seen), Some(uid)) = (&mut self.relisted, &pod.metadata.uid) {
                        seen.insert(uid.clone());
                    }
                    self.apply(pod);
                }
                Ok(watcher::Event::Delete(pod)) => {
                    if let Some(uid) = &pod.metadata.uid {
                        self.forget(uid);
                    }
                }
                Ok(watcher::Event::Init) => self.relisted = Some(HashSet::new()),
                Ok(watcher::Event::InitDone) => {
                    if let Some(seen) = self.relisted.take() {
                        let gone: Vec<String> = self
                            .pods
                            .keys()
                            .chain(self.binding.iter())
                            .filter(|uid| !seen.contains(*uid))
                            .cloned()
                            .collect();
                        for uid in gone {
                            self.forget(&uid);
                        }
                    }
                }
                Err(e) => eprintln!("[test-node] pod watch: {e} (retrying)"),
            }
        }
    }

    fn forget(&mut self, uid: &str) {
        self.binding.remove(uid);
        if let Some(pod) = self.pods.remove(uid) {
            pod.send_replace(None);
        }
    }

    fn apply(&mut self, pod: Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        let node = pod
            .spec
            .as_ref()
            .and_then(|spec| spec.node_name.as_deref())
            .unwrap_or("");
        if node.is_empty() {
            if pod.metadata.deletion_timestamp.is_none() && self.binding.insert(uid.clone()) {
                self.tasks.spawn(bind(self.shared.clone(), pod));
            }
        } else if node == self.shared.config.name {
            self.binding.remove(&uid);
            let pod = Arc::new(pod);
            match self.pods.get(&uid) {
                Some(sender) => {
                    sender.send_replace(Some(pod));
                }
                None => {
                    let (sender, receiver) = watch::channel(Some(pod.clone()));
                    self.tasks
                        .spawn(PodRunner::new(self.shared.clone(), pod, receiver).run());
                    self.pods.insert(uid, sender);
                }
            }
        }
    }
}

/// Binds a pod to this node, as the scheduler would. The binding names the pod's uid, so a
/// pod recreated under the same name is never bound by a stale event.
async fn bind(shared: Arc<Shared>, pod: Pod) {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &namespace);
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            uid: pod.metadata.uid.clone(),
            ..ObjectMeta::default()
        },
        target: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(shared.config.name.clone()),
            ..ObjectReference::default()
        },
    };
    for attempt in 1..=30 {
        let result: Result<serde_json::Value, _> = api
            .create_subresource("binding", &name, &PostParams::default(), &binding)
            .await;
        match result {
            Ok(_) => return,
            // Already bound (an earlier event), recreated, or gone: nothing to do.
            Err(e) if matches!(api_code(&e), Some(404 | 409)) => return,
            Err(e) => {
                log(
                    &namespace,
                    &name,
                    format!("binding (attempt {attempt}): {e}"),
                );
                tokio::time::sleep(CONFIG_RETRY).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One pod: its containers, status and deletion.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    fn of(pod: &Pod) -> Self {
        match pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()) {
            Some("Never") => Self::Never,
            Some("OnFailure") => Self::OnFailure,
            _ => Self::Always,
        }
    }

    fn restarts(self, exit_code: i32) -> bool {
        match self {
            Self::Always => true,
            Self::OnFailure => exit_code != 0,
            Self::Never => false,
        }
    }
}

#[derive(Clone, Debug)]
struct Terminated {
    exit_code: i32,
    signal: Option<i32>,
    reason: String,
    message: Option<String>,
    started_at: Option<Time>,
    finished_at: Time,
    container_id: Option<String>,
}

#[derive(Clone, Debug)]
enum State {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: Time,
        run: u64,
        group: i32,
    },
    Terminated(Terminated),
}

/// One container of the pod and what has happened to it.
struct Ctr {
    spec: Container,
    state: State,
    last_state: Option<Terminated>,
    /// Instances created so far (a failed start counts, as it does for the kubelet).
    instances: i32,
    /// When to (re)try starting it; None while it runs or when it is done for good.
    next_start: Option<Instant>,
    container_id: Option<String>,
}

impl Ctr {
    fn new(spec: Container, reason: &str) -> Self {
        Self {
            spec,
            state: State::Waiting {
                reason: reason.into(),
                message: None,
            },
            last_state: None,
            instances: 0,
            next_start: None,
            container_id: None,
        }
    }

    /// Replaces the state, keeping a termination as `lastState` as the kubelet reports it.
    fn set_state(&mut self, state: State) {
        if let State::Terminated(previous) = std::mem::replace(&mut self.state, state) {
            self.last_state = Some(previous);
        }
    }

    fn group(&self) -> Option<i32> {
        match self.state {
            State::Running { group, .. } => Some(group),
            _ => None,
        }
    }

    fn summary(&self) -> Summary {
        match &self.state {
            State::Running { .. } => Summary::Running,
            State::Terminated(t) => Summary::Exited(t.exit_code),
            State::Waiting { .. } if self.last_state.is_some() => Summary::Exited(-1),
            State::Waiting { .. } => Summary::NotStarted,
        }
    }

    /// Its status; `ready` says whether a running container counts as ready.
    fn status(&self, ready: bool) -> ContainerStatus {
        let image = self.spec.image.clone().unwrap_or_default();
        let running = matches!(self.state, State::Running { .. });
        ContainerStatus {
            name: self.spec.name.clone(),
            image_id: format!("cambrian-test-node://{}", image_name(&image)),
            image,
            container_id: self.container_id.clone(),
            ready: ready && running,
            started: Some(running),
            restart_count: (self.instances - 1).max(0),
            state: Some(match &self.state {
                State::Waiting { reason, message } => ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some(reason.clone()),
                        message: message.clone(),
                    }),
                    ..ContainerState::default()
                },
                State::Running { started_at, .. } => ContainerState {
                    running: Some(ContainerStateRunning {
                        started_at: Some(started_at.clone()),
                    }),
                    ..ContainerState::default()
                },
                State::Terminated(t) => terminated_state(t),
            }),
            last_state: self.last_state.as_ref().map(terminated_state),
            ..ContainerStatus::default()
        }
    }
}

fn terminated_state(t: &Terminated) -> ContainerState {
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: t.exit_code,
            signal: t.signal,
            reason: Some(t.reason.clone()),
            message: t.message.clone(),
            started_at: t.started_at.clone(),
            finished_at: Some(t.finished_at.clone()),
            container_id: t.container_id.clone(),
        }),
        ..ContainerState::default()
    }
}

/// A container as the pod phase sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Summary {
    /// Waiting, and never ran.
    NotStarted,
    Running,
    /// Ran and ended (or is waiting to run again after ending); -1 for "not known to be 0".
    Exited(i32),
}

/// The pod phase from its (main) containers, by the kubelet's rules (`getPhase`): a container
/// that never started keeps the pod Pending; with every container ended, `Always` and
/// `OnFailure` pods are restarting, hence Running, unless every container succeeded.
fn pod_phase(policy: RestartPolicy, containers: &[Summary]) -> &'static str {
    let (mut waiting, mut running, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for c in containers {
        match c {
            Summary::NotStarted => waiting += 1,
            Summary::Running => running += 1,
            Summary::Exited(code) => {
                stopped += 1;
                if *code == 0 {
                    succeeded += 1;
                }
            }
        }
    }
    if waiting > 0 || containers.is_empty() {
        "Pending"
    } else if running > 0 || policy == RestartPolicy::Always {
        "Running"
    } else if stopped == succeeded {
        "Succeeded"
    } else if policy == RestartPolicy::Never {
        "Failed"
    } else {
        "Running"
    }
}

/// A process of ours that ended.
struct Exit {
    init: bool,
    index: usize,
    run: u64,
    exit_code: i32,
    signal: Option<i32>,
    finished_at: Time,
}

/// Why a container could not be started this time.
enum StartFailure {
    /// Try again later; the container waits with this reason.
    Waiting {
        reason: &'static str,
        message: String,
        retry: Duration,
    },
    /// The process could not be spawned: a terminated instance, as for the kubelet's
    /// StartError, and the restart policy decides what follows.
    Spawn(String),
}

struct Launched {
    group: i32,
    child: tokio::process::Child,
}

struct Termination {
    since: Instant,
    deadline: Instant,
    killed: bool,
}

enum Wake {
    Pod(Option<Arc<Pod>>),
    Exit(Exit),
    Timer,
}

struct PodRunner {
    shared: Arc<Shared>,
    updates: watch::Receiver<Option<Arc<Pod>>>,
    pod: Arc<Pod>,
    namespace: String,
    name: String,
    uid: String,
    dir: PathBuf,
    dir_ready: bool,
    policy: RestartPolicy,
    init: Vec<Ctr>,
    main: Vec<Ctr>,
    init_done: bool,
    start_time: Option<Time>,
    /// Succeeded or Failed, for good.
    terminal: Option<&'static str>,
    terminating: Option<Termination>,
    /// Processes are gone and the final status is to be written before the pod is deleted.
    finalized: bool,
    deleted: bool,
    delete_retry: Option<Instant>,
    /// Condition type -> (status, last transition), for honest lastTransitionTimes.
    conditions: BTreeMap<&'static str, (bool, Time)>,
    last_written: Option<serde_json::Value>,
    status_clean: bool,
    status_retry: Option<Instant>,
    exits: mpsc::UnboundedReceiver<Exit>,
    exits_sender: mpsc::UnboundedSender<Exit>,
    runs: u64,
}

impl PodRunner {
    fn new(shared: Arc<Shared>, pod: Arc<Pod>, updates: watch::Receiver<Option<Arc<Pod>>>) -> Self {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let init: Vec<Ctr> = spec
            .init_containers
            .unwrap_or_default()
            .into_iter()
            .map(|c| Ctr::new(c, "PodInitializing"))
            .collect();
        let main_reason = if init.is_empty() {
            "ContainerCreating"
        } else {
            "PodInitializing"
        };
        let main = spec
            .containers
            .into_iter()
            .map(|c| Ctr::new(c, main_reason))
            .collect();
        let (exits_sender, exits) = mpsc::unbounded_channel();
        Self {
            dir: shared.pod_dir(&namespace, &name),
            shared,
            updates,
            policy: RestartPolicy::of(&pod),
            pod,
            namespace,
            name,
            uid,
            dir_ready: false,
            init,
            main,
            init_done: false,
            start_time: None,
            terminal: None,
            terminating: None,
            finalized: false,
            deleted: false,
            delete_retry: None,
            conditions: BTreeMap::new(),
            last_written: None,
            status_clean: false,
            status_retry: None,
            exits,
            exits_sender,
            runs: 0,
        }
    }

    fn log(&self, message: impl std::fmt::Display) {
        log(&self.namespace, &self.name, message);
    }

    async fn run(mut self) {
        let phase = self.pod.status.as_ref().and_then(|s| s.phase.as_deref());
        match phase {
            // Finished before this node saw it (an earlier node, or our own earlier run):
            // only its deletion is left to handle.
            Some("Succeeded") => self.terminal = Some("Succeeded"),
            Some("Failed") => self.terminal = Some("Failed"),
            _ => {
                self.start_time = Some(Time(Timestamp::now()));
                let now = Instant::now();
                match self.init.first_mut() {
                    Some(first) => first.next_start = Some(now),
                    None => self.start_main(now),
                }
            }
        }
        if self.terminal.is_some() {
            // Nothing of ours to report for it.
            self.status_clean = true;
        }
        if self.pod.metadata.deletion_timestamp.is_some() {
            self.begin_termination();
        }
        loop {
            self.on_timers().await;
            self.finish_termination();
            self.write_status().await;
            self.delete_if_done().await;
            match self.wait().await {
                Wake::Pod(None) => {
                    // The pod is gone (or the node is shutting down): nothing may outlive it.
                    for c in self.init.iter().chain(&self.main) {
                        if let Some(group) = c.group() {
                            kill_group(group, libc::SIGKILL);
                        }
                    }
                    return;
                }
                Wake::Pod(Some(pod)) => {
                    self.pod = pod;
                    if self.pod.metadata.deletion_timestamp.is_some() {
                        self.begin_termination();
                    }
                }
                Wake::Exit(exit) => self.on_exit(exit),
                Wake::Timer => {}
            }
        }
    }

    async fn wait(&mut self) -> Wake {
        let deadline = self.next_deadline();
        let timer = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = self.updates.changed() => match changed {
                Ok(()) => Wake::Pod(self.updates.borrow_and_update().clone()),
                Err(_) => Wake::Pod(None),
            },
            Some(exit) = self.exits.recv() => Wake::Exit(exit),
            () = timer => Wake::Timer,
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut deadlines: Vec<Instant> = Vec::new();
        match &self.terminating {
            Some(t) if !t.killed => deadlines.push(t.deadline),
            Some(_) => {}
            None if self.terminal.is_none() => deadlines.extend(
                self.init
                    .iter()
                    .chain(&self.main)
                    .filter_map(|c| c.next_start),
            ),
            None => {}
        }
        if !self.status_clean {
            deadlines.extend(self.status_retry);
        }
        if self.finalized && !self.deleted {
            deadlines.extend(self.delete_retry);
        }
        deadlines.into_iter().min()
    }

    fn start_main(&mut self, at: Instant) {
        self.init_done = true;
        for c in &mut self.main {
            c.next_start = Some(at);
        }
    }

    async fn on_timers(&mut self) {
        let now = Instant::now();
        if let Some(t) = &mut self.terminating {
            if !t.killed && t.deadline <= now {
                t.killed = true;
                for c in self.init.iter().chain(&self.main) {
                    if let Some(group) = c.group() {
                        kill_group(group, libc::SIGKILL);
                    }
                }
            }
            return;
        }
        if self.terminal.is_some() {
            return;
        }
        let due: Vec<(bool, usize)> = self
            .init
            .iter()
            .enumerate()
            .map(|(i, c)| (true, i, c))
            .chain(self.main.iter().enumerate().map(|(i, c)| (false, i, c)))
            .filter(|(_, _, c)| c.next_start.is_some_and(|at| at <= now))
            .map(|(init, i, _)| (init, i))
            .collect();
        for (init, index) in due {
            if self.terminating.is_some() {
                break;
            }
            self.start(init, index).await;
        }
    }

    fn ctr_mut(&mut self, init: bool, index: usize) -> Option<&mut Ctr> {
        if init {
            self.init.get_mut(index)
        } else {
            self.main.get_mut(index)
        }
    }

    async fn start(&mut self, init: bool, index: usize) {
        let Some(c) = self.ctr_mut(init, index) else {
            return;
        };
        c.next_start = None;
        let spec = c.spec.clone();
        let outcome = match tokio::time::timeout(PREPARE_TIMEOUT, self.launch(&spec)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(StartFailure::Waiting {
                reason: "ContainerCreating",
                message: "the API server did not answer in time".into(),
                retry: CONFIG_RETRY,
            }),
        };
        let now = Time(Timestamp::now());
        self.runs += 1;
        let run = self.runs;
        let namespace = self.namespace.clone();
        let pod = self.name.clone();
        let Some(c) = self.ctr_mut(init, index) else {
            return;
        };
        match outcome {
            Ok(Launched { group, mut child }) => {
                c.instances += 1;
                c.container_id = Some(format!("cambrian-test-node://{group}"));
                c.set_state(State::Running {
                    started_at: now,
                    run,
                    group,
                });
                log(
                    &namespace,
                    &pod,
                    format!("container {} started (pid {group})", spec.name),
                );
                let shared = self.shared.clone();
                let exits = self.exits_sender.clone();
                tokio::spawn(async move {
                    let status = child.wait().await;
                    // The container ends with its main process, as in a PID namespace.
                    kill_group(group, libc::SIGKILL);
                    shared.groups().remove(&group);
                    let (exit_code, signal) = match status {
                        Ok(s) => match (s.code(), s.signal()) {
                            (Some(code), _) => (code, None),
                            (None, Some(signal)) => (128 + signal, Some(signal)),
                            (None, None) => (-1, None),
                        },
                        Err(_) => (-1, None),
                    };
                    let _ = exits.send(Exit {
                        init,
                        index,
                        run,
                        exit_code,
                        signal,
                        finished_at: Time(Timestamp::now()),
                    });
                });
            }
            Err(StartFailure::Waiting {
                reason,
                message,
                retry,
            }) => {
                let changed = !matches!(
                    &c.state,
                    State::Waiting { reason: r, message: Some(m) } if r == reason && *m == message
                );
                c.set_state(State::Waiting {
                    reason: reason.into(),
                    message: Some(message.clone()),
                });
                c.next_start = Some(Instant::now() + retry);
                if changed {
                    log(
                        &namespace,
                        &pod,
                        format!("container {}: {reason}: {message}", spec.name),
                    );
                }
            }
            Err(StartFailure::Spawn(message)) => {
                log(
                    &namespace,
                    &pod,
                    format!("container {}: StartError: {message}", spec.name),
                );
                c.instances += 1;
                c.container_id = None;
                c.set_state(State::Terminated(Terminated {
                    exit_code: 128,
                    signal: None,
                    reason: "StartError".into(),
                    message: Some(message),
                    started_at: None,
                    finished_at: now,
                    container_id: None,
                }));
                self.after_exit(init, index, 128);
            }
        }
    }

    fn on_exit(&mut self, exit: Exit) {
        let (namespace, pod) = (self.namespace.clone(), self.name.clone());
        let Some(c) = self.ctr_mut(exit.init, exit.index) else {
            return;
        };
        let State::Running {
            started_at, run, ..
        } = &c.state
        else {
            return;
        };
        if *run != exit.run {
            return;
        }
        let started_at = Some(started_at.clone());
        log(
            &namespace,
            &pod,
            format!("container {} exited with {}", c.spec.name, exit.exit_code),
        );
        c.set_state(State::Terminated(Terminated {
            exit_code: exit.exit_code,
            signal: exit.signal,
            reason: if exit.exit_code == 0 {
                "Completed"
            } else {
                "Error"
            }
            .into(),
            message: None,
            started_at,
            finished_at: exit.finished_at,
            container_id: c.container_id.clone(),
        }));
        if self.terminating.is_none() {
            self.after_exit(exit.init, exit.index, exit.exit_code);
        }
    }

    /// What follows a container's end: the next init container, or a restart.
    fn after_exit(&mut self, init: bool, index: usize, exit_code: i32) {
        let now = Instant::now();
        if init && exit_code == 0 {
            match self.init.get_mut(index + 1) {
                Some(next) => next.next_start = Some(now),
                None => self.start_main(now),
            }
            return;
        }
        // Init containers that fail are retried under both OnFailure and Always.
        if self.policy.restarts(exit_code) {
            if let Some(c) = self.ctr_mut(init, index) {
                c.next_start = Some(now + RESTART_BACKOFF);
            }
        }
    }

    fn begin_termination(&mut self) {
        let grace = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .unwrap_or(30)
            .max(0);
        let grace = Duration::from_secs(u64::try_from(grace).unwrap_or(0));
        if let Some(t) = &mut self.terminating {
            // A second delete may shorten the grace period, never lengthen it.
            t.deadline = t.deadline.min(t.since + grace);
            return;
        }
        let now = Instant::now();
        self.log(format!(
            "deleted: stopping containers (grace period {} s)",
            grace.as_secs()
        ));
        self.terminating = Some(Termination {
            since: now,
            deadline: now + grace,
            killed: false,
        });
        for c in self.init.iter_mut().chain(&mut self.main) {
            c.next_start = None;
            if let Some(group) = c.group() {
                kill_group(group, libc::SIGTERM);
            }
        }
    }

    /// Once a deleted pod's processes are gone: its final container states and phase.
    fn finish_termination(&mut self) {
        if self.terminating.is_none() || self.finalized {
            return;
        }
        if self
            .init
            .iter()
            .chain(&self.main)
            .any(|c| c.group().is_some())
        {
            return;
        }
        self.finalized = true;
        if self.terminal.is_some() {
            return;
        }
        let now = Time(Timestamp::now());
        for c in self.init.iter_mut().chain(&mut self.main) {
            if matches!(c.state, State::Waiting { .. }) {
                // What the kubelet reports for a container that never ran in a deleted pod.
                c.set_state(State::Terminated(Terminated {
                    exit_code: 137,
                    signal: None,
                    reason: "ContainerStatusUnknown".into(),
                    message: Some(
                        "The container could not be located when the pod was terminated".into(),
                    ),
                    started_at: None,
                    finished_at: now.clone(),
                    container_id: None,
                }));
            }
        }
        let succeeded = self.init_done
            && self.main.iter().all(|c| {
                c.instances > 0 && matches!(&c.state, State::Terminated(t) if t.exit_code == 0)
            });
        self.terminal = Some(if succeeded { "Succeeded" } else { "Failed" });
    }

    /// Deletes the pod for good once its final status is written, as the kubelet does: the
    /// API server only marked it; the node confirms its containers are gone.
    async fn delete_if_done(&mut self) {
        if !self.finalized || self.deleted || !self.status_clean {
            return;
        }
        if self.delete_retry.is_some_and(|at| at > Instant::now()) {
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), &self.namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(&self.name, &params).await {
            Ok(_) => self.deleted = true,
            Err(e) if matches!(api_code(&e), Some(404 | 409)) => self.deleted = true,
            Err(e) => {
                self.log(format!("deleting: {e} (retrying)"));
                self.delete_retry = Some(Instant::now() + CONFIG_RETRY);
            }
        }
    }

    fn phase(&mut self) -> &'static str {
        if let Some(phase) = self.terminal {
            return phase;
        }
        let phase = if !self.init_done {
            let failed = self
                .init
                .iter()
                .any(|c| matches!(&c.state, State::Terminated(t) if t.exit_code != 0));
            if failed && self.policy == RestartPolicy::Never {
                "Failed"
            } else {
                "Pending"
            }
        } else {
            let summaries: Vec<Summary> = self.main.iter().map(Ctr::summary).collect();
            pod_phase(self.policy, &summaries)
        };
        // Phases Succeeded and Failed are final, as in Kubernetes; while deleting, the final
        // phase is decided once the processes are gone.
        if matches!(phase, "Succeeded" | "Failed") && self.terminating.is_none() {
            self.terminal = Some(phase);
            for c in self.init.iter_mut().chain(&mut self.main) {
                c.next_start = None;
            }
        }
        phase
    }

    fn condition(
        &mut self,
        type_: &'static str,
        ok: bool,
        reason: Option<&str>,
        message: Option<String>,
    ) -> PodCondition {
        let now = Time(Timestamp::now());
        let entry = self.conditions.entry(type_).or_insert((ok, now.clone()));
        if entry.0 != ok {
            *entry = (ok, now);
        }
        PodCondition {
            type_: type_.into(),
            status: if ok { "True" } else { "False" }.into(),
            last_transition_time: Some(entry.1.clone()),
            reason: if ok { None } else { reason.map(Into::into) },
            message: if ok { None } else { message },
            ..PodCondition::default()
        }
    }

    fn status(&mut self) -> PodStatus {
        let phase = self.phase();
        let terminal = matches!(phase, "Succeeded" | "Failed");
        let unready: Vec<String> = self
            .main
            .iter()
            .filter(|c| !matches!(c.state, State::Running { .. }))
            .map(|c| c.spec.name.clone())
            .collect();
        // With no probes, a running container is ready, until its pod is done or deleted.
        let containers_ready = !terminal && self.terminating.is_none();
        let ready = containers_ready && unready.is_empty();
        let uninitialized: Vec<String> = self
            .init
            .iter()
            .filter(|c| !matches!(&c.state, State::Terminated(t) if t.exit_code == 0))
            .map(|c| c.spec.name.clone())
            .collect();
        let (ready_reason, ready_message) = if terminal {
            ("PodCompleted", None)
        } else {
            (
                "ContainersNotReady",
                Some(format!(
                    "containers with unready status: [{}]",
                    unready.join(" ")
                )),
            )
        };
        let conditions = vec![
            self.condition("PodScheduled", true, None, None),
            self.condition(
                "Initialized",
                self.init_done,
                Some(if terminal {
                    "PodCompleted"
                } else {
                    "ContainersNotInitialized"
                }),
                Some(format!(
                    "containers with incomplete status: [{}]",
                    uninitialized.join(" ")
                )),
            ),
            self.condition(
                "ContainersReady",
                ready,
                Some(ready_reason),
                ready_message.clone(),
            ),
            self.condition("Ready", ready, Some(ready_reason), ready_message),
        ];
        let init_statuses: Vec<ContainerStatus> =
            self.init.iter().map(|c| c.status(false)).collect();
        PodStatus {
            phase: Some(phase.into()),
            conditions: Some(conditions),
            host_ip: Some(LOOPBACK.into()),
            host_ips: Some(vec![HostIP {
                ip: LOOPBACK.into(),
            }]),
            pod_ip: Some(LOOPBACK.into()),
            pod_ips: Some(vec![PodIP {
                ip: LOOPBACK.into(),
            }]),
            start_time: self.start_time.clone(),
            container_statuses: Some(
                self.main
                    .iter()
                    .map(|c| c.status(containers_ready))
                    .collect(),
            ),
            init_container_statuses: (!init_statuses.is_empty()).then_some(init_statuses),
            ..PodStatus::default()
        }
    }

    /// Writes the status if it changed. The patch names the pod's uid, so it fails rather
    /// than lands on a pod recreated under the same name.
    async fn write_status(&mut self) {
        if self.deleted {
            return;
        }
        if self.start_time.is_none() {
            // A pod that finished before we took it on: its status is not ours to rewrite.
            return;
        }
        if self.status_retry.is_some_and(|at| at > Instant::now()) {
            return;
        }
        let status = self.status();
        let body = serde_json::json!({
            "metadata": { "uid": self.uid },
            "status": status,
        });
        if self.last_written.as_ref() == Some(&body) {
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.shared.client.clone(), &self.namespace);
        match api
            .patch_status(
                &self.name,
                &PatchParams::default(),
                &Patch::Strategic(&body),
            )
            .await
        {
            Ok(_) => {
                self.last_written = Some(body);
                self.status_clean = true;
                self.status_retry = None;
            }
            // Gone, or replaced by another pod of that name (the uid no longer matches): the
            // watch will say so. A status the API server rejects would be rejected again.
            Err(e) if matches!(api_code(&e), Some(404 | 409 | 422)) => {
                if api_code(&e) == Some(422) {
                    self.log(format!("status rejected: {e}"));
                }
                self.last_written = Some(body);
                self.status_clean = true;
                self.status_retry = None;
            }
            Err(e) => {
                self.log(format!("writing status: {e} (retrying)"));
                self.status_clean = false;
                self.status_retry = Some(Instant::now() + Duration::from_secs(1));
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Starting one container.

    /// The pod's folder, fresh for each pod: emptyDir volumes start empty, and a folder left
    /// by an earlier pod of the same name is kept aside (`<pod>.<uid>`) for post-mortems.
    fn prepare_dir(&mut self) -> std::io::Result<()> {
        if self.dir_ready {
            return Ok(());
        }
        let uid_file = self.dir.join(".uid");
        if self.dir.exists() {
            let previous = std::fs::read_to_string(&uid_file).unwrap_or_default();
            if previous.trim() != self.uid {
                let aside = self.dir.with_file_name(format!(
                    "{}.{}",
                    self.name,
                    if previous.trim().is_empty() {
                        "previous"
                    } else {
                        previous.trim()
                    }
                ));
                let _ = std::fs::remove_dir_all(&aside);
                std::fs::rename(&self.dir, &aside)?;
            }
        }
        std::fs::create_dir_all(&self.dir)?;
        std::fs::write(&uid_file, &self.uid)?;
        for volume in self
            .pod
            .spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
        {
            if volume.empty_dir.is_some() {
                std::fs::create_dir_all(self.dir.join("volumes").join(&volume.name))?;
            }
        }
        self.dir_ready = true;
        Ok(())
    }

    /// The container's emptyDir mounts: mount path -> local folder.
    fn mounts(&self, container: &Container) -> Vec<(String, PathBuf)> {
        let empty_dirs: HashSet<&str> = self
            .pod
            .spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .filter(|v| v.empty_dir.is_some())
            .map(|v| v.name.as_str())
            .collect();
        container
            .volume_mounts
            .iter()
            .flatten()
            .filter(|m| empty_dirs.contains(m.name.as_str()))
            .map(|m| {
                let mut local = self.dir.join("volumes").join(&m.name);
                if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                    local = local.join(sub);
                }
                (m.mount_path.clone(), local)
            })
            .collect()
    }

    async fn launch(&mut self, container: &Container) -> Result<Launched, StartFailure> {
        let image = container.image.clone().unwrap_or_default();
        let folder = image_folder(&self.shared.config.images, &image)
            .map(Path::to_path_buf)
            .ok_or_else(|| StartFailure::Waiting {
                reason: "ErrImagePull",
                message: format!("image {image:?} is not one the test node has executables for"),
                retry: IMAGE_RETRY,
            })?;
        self.prepare_dir().map_err(|e| StartFailure::Waiting {
            reason: "ContainerCreating",
            message: format!("preparing {}: {e}", self.dir.display()),
            retry: CONFIG_RETRY,
        })?;
        let view = self
            .pod_env(container)
            .await
            .map_err(|message| StartFailure::Waiting {
                reason: "CreateContainerConfigError",
                message,
                retry: CONFIG_RETRY,
            })?;
        let automount = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.automount_service_account_token)
            != Some(false);
        let kubeconfig = if automount {
            Some(
                self.write_kubeconfig()
                    .await
                    .map_err(|message| StartFailure::Waiting {
                        reason: "ContainerCreating",
                        message,
                        retry: CONFIG_RETRY,
                    })?,
            )
        } else {
            None
        };
        let mounts = self.mounts(container);
        for (_, local) in &mounts {
            std::fs::create_dir_all(local).map_err(|e| StartFailure::Waiting {
                reason: "ContainerCreating",
                message: format!("preparing {}: {e}", local.display()),
                retry: CONFIG_RETRY,
            })?;
        }

        // Command and args see `$(VAR)` as the pod declared them, then get local paths.
        let lookup = |name: &str| view.get(name).cloned();
        let expand_all = |items: &Option<Vec<String>>| -> Vec<String> {
            items
                .iter()
                .flatten()
                .map(|item| rewrite_arg(&expand(item, lookup), &mounts))
                .collect()
        };
        let command = expand_all(&container.command);
        let args = expand_all(&container.args);
        let (executable, argv) = executable(&folder, &image, &command, &args);

        let mut env: BTreeMap<String, String> = BTreeMap::new();
        if let Some(path) = std::env::var_os("PATH") {
            env.insert("PATH".into(), path.to_string_lossy().into_owned());
        }
        env.insert("HOME".into(), self.dir.to_string_lossy().into_owned());
        for (name, value) in &view {
            env.insert(name.clone(), rewrite_path(value, &mounts));
        }
        if let Some((_, tmp)) = mounts
            .iter()
            .find(|(path, _)| path.trim_end_matches('/') == "/tmp")
        {
            env.insert("TMPDIR".into(), tmp.to_string_lossy().into_owned());
        }
        if let Some(kubeconfig) = kubeconfig {
            env.insert(
                "KUBECONFIG".into(),
                kubeconfig.to_string_lossy().into_owned(),
            );
        }
        for (name, value) in &self.shared.config.env_overrides {
            env.insert(name.clone(), value.clone());
        }

        let log_path = self.dir.join(format!("{}.log", container.name));
        let open_log = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|e| StartFailure::Spawn(format!("opening {}: {e}", log_path.display())))
        };
        let (stdout, stderr) = (open_log()?, open_log()?);
        let mut command = tokio::process::Command::new(&executable);
        command
            .args(&argv)
            .env_clear()
            .envs(&env)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0);
        // A test process that exits never drops its node (it lives in a static): the kernel
        // kills the container's process when the thread that started it, a runtime worker
        // living as long as the process, goes away.
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // Registered before anything can fail to be cleaned up on Drop.
        let mut groups = self.shared.groups();
        let child = command
            .spawn()
            .map_err(|e| StartFailure::Spawn(format!("{}: {e}", executable.display())))?;
        let group = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .ok_or_else(|| StartFailure::Spawn("the process vanished at once".into()))?;
        groups.insert(group);
        Ok(Launched { group, child })
    }

    /// The container's environment as it would see it in a cluster (paths still the pod's):
    /// the kubelet's own variables, then `envFrom`, then `env`.
    async fn pod_env(&self, container: &Container) -> Result<BTreeMap<String, String>, String> {
        let mut env = BTreeMap::new();
        let hostname = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.hostname.clone())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| pod_hostname(&self.name));
        env.insert("HOSTNAME".to_string(), hostname);
        let (host, port) = service_host_port(&self.shared.config.server);
        env.insert("KUBERNETES_SERVICE_HOST".into(), host);
        env.insert("KUBERNETES_SERVICE_PORT".into(), port.clone());
        env.insert("KUBERNETES_SERVICE_PORT_HTTPS".into(), port);

        let mut sources = Sources::new(self.shared.client.clone(), &self.namespace);
        for from in container.env_from.iter().flatten() {
            let prefix = from.prefix.as_deref().unwrap_or("");
            if let Some(reference) = &from.secret_ref {
                match sources.secret(&reference.name).await? {
                    Some(secret) => {
                        for (key, value) in secret.data.iter().flatten() {
                            env.insert(format!("{prefix}{key}"), bytes_text(value));
                        }
                    }
                    None if reference.optional == Some(true) => {}
                    None => return Err(format!("secret {:?} not found", reference.name)),
                }
            }
            if let Some(reference) = &from.config_map_ref {
                match sources.config_map(&reference.name).await? {
                    Some(config_map) => {
                        for (key, value) in config_map.data.iter().flatten() {
                            env.insert(format!("{prefix}{key}"), value.clone());
                        }
                    }
                    None if reference.optional == Some(true) => {}
                    None => return Err(format!("configmap {:?} not found", reference.name)),
                }
            }
        }

        for var in container.env.iter().flatten() {
            let value = match &var.value_from {
                None => expand(var.value.as_deref().unwrap_or(""), |name| {
                    env.get(name).cloned()
                }),
                Some(source) => {
                    if let Some(selector) = &source.secret_key_ref {
                        let optional = selector.optional == Some(true);
                        let value = match sources.secret(&selector.name).await? {
                            None if optional => None,
                            None => return Err(format!("secret {:?} not found", selector.name)),
                            Some(secret) => {
                                match secret.data.as_ref().and_then(|d| d.get(&selector.key)) {
                                    Some(bytes) => Some(bytes_text(bytes)),
                                    None if optional => None,
                                    None => {
                                        return Err(format!(
                                            "couldn't find key {} in Secret {}/{}",
                                            selector.key, self.namespace, selector.name
                                        ))
                                    }
                                }
                            }
                        };
                        match value {
                            Some(value) => value,
                            None => continue,
                        }
                    } else if let Some(selector) = &source.config_map_key_ref {
                        let optional = selector.optional == Some(true);
                        let value = match sources.config_map(&selector.name).await? {
                            None if optional => None,
                            None => return Err(format!("configmap {:?} not found", selector.name)),
                            Some(config_map) => {
                                let text = config_map
                                    .data
                                    .as_ref()
                                    .and_then(|d| d.get(&selector.key))
                                    .cloned();
                                let binary = || {
                                    config_map
                                        .binary_data
                                        .as_ref()
                                        .and_then(|d| d.get(&selector.key))
                                        .map(bytes_text)
                                };
                                match text.or_else(binary) {
                                    Some(value) => Some(value),
                                    None if optional => None,
                                    None => {
                                        return Err(format!(
                                            "couldn't find key {} in ConfigMap {}/{}",
                                            selector.key, self.namespace, selector.name
                                        ))
                                    }
                                }
                            }
                        };
                        match value {
                            Some(value) => value,
                            None => continue,
                        }
                    } else if let Some(selector) = &source.field_ref {
                        field_value(&self.pod, &selector.field_path, &self.shared.config.name)?
                    } else if let Some(selector) = &source.resource_field_ref {
                        resource_value(container, selector)
                    } else {
                        String::new()
                    }
                }
            };
            env.insert(var.name.clone(), value);
        }
        Ok(env)
    }

    /// A kubeconfig with a fresh token for the pod's service account: what the projected
    /// token volume and in-cluster config give a real pod, in the one form a process on this
    /// host can use (kube clients read `KUBECONFIG` before trying in-cluster config).
    async fn write_kubeconfig(&self) -> Result<PathBuf, String> {
        let spec = self.pod.spec.as_ref();
        let account = spec
            .and_then(|s| s.service_account_name.clone())
            .or_else(|| spec.and_then(|s| s.service_account.clone()))
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| "default".into());
        let api: Api<ServiceAccount> = Api::namespaced(self.shared.client.clone(), &self.namespace);
        let request = TokenRequest {
            metadata: ObjectMeta::default(),
            spec: TokenRequestSpec {
                audiences: Vec::new(),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(self.name.clone()),
                    uid: Some(self.uid.clone()),
                }),
                expiration_seconds: Some(3600),
            },
            status: None,
        };
        let response: TokenRequest = api
            .create_subresource("token", &account, &PostParams::default(), &request)
            .await
            .map_err(|e| {
                format!(
                    "requesting a token for service account {}/{account}: {e}",
                    self.namespace
                )
            })?;
        let token = response
            .status
            .map(|s| s.token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| format!("no token returned for service account {account}"))?;
        let text = kubeconfig(
            &self.shared.config.server,
            &self.shared.config.ca_pem,
            &token,
            &self.namespace,
        );
        // Written whole and renamed into place: a running container may be reading it.
        let path = self.dir.join("kubeconfig");
        let partial = self.dir.join(".kubeconfig.partial");
        std::fs::write(&partial, text)
            .and_then(|()| std::fs::rename(&partial, &path))
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok(path)
    }
}

/// Secrets and ConfigMaps fetched for one container start, so each is read once per start.
struct Sources {
    secrets: Api<Secret>,
    config_maps: Api<ConfigMap>,
    secret_cache: HashMap<String, Option<Secret>>,
    config_map_cache: HashMap<String, Option<ConfigMap>>,
}

impl Sources {
    fn new(client: Client, namespace: &str) -> Self {
        Self {
            secrets: Api::namespaced(client.clone(), namespace),
            config_maps: Api::namespaced(client, namespace),
            secret_cache: HashMap::new(),
            config_map_cache: HashMap::new(),
        }
    }

    async fn secret(&mut self, name: &str) -> Result<Option<Secret>, String> {
        if let Some(cached) = self.secret_cache.get(name) {
            return Ok(cached.clone());
        }
        let found = self
            .secrets
            .get_opt(name)
            .await
            .map_err(|e| format!("getting secret {name:?}: {e}"))?;
        self.secret_cache.insert(name.to_string(), found.clone());
        Ok(found)
    }

    async fn config_map(&mut self, name: &str) -> Result<Option<ConfigMap>, String> {
        if let Some(cached) = self.config_map_cache.get(name) {
            return Ok(cached.clone());
        }
        let found = self
            .config_maps
            .get_opt(name)
            .await
            .map_err(|e| format!("getting configmap {name:?}: {e}"))?;
        self.config_map_cache
            .insert(name.to_string(), found.clone());
        Ok(found)
    }
}

fn bytes_text(bytes: &ByteString) -> String {
    String::from_utf8_lossy(&bytes.0).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Pure helpers.

/// The image's name without `:tag` or `@digest`. A colon before the last slash is a registry
/// port, not a tag.
fn image_name(image: &str) -> &str {
    let image = image.split_once('@').map_or(image, |(name, _)| name);
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_slash..].find(':') {
        Some(colon) => &image[..last_slash + colon],
        None => image,
    }
}

/// The folder serving `image`: the longest configured name equal to the image's name or a
/// path prefix of it ("ghcr.io/x" serves "ghcr.io/x/trainer" but not "ghcr.io/xy").
fn image_folder<'a>(images: &'a [(String, PathBuf)], image: &str) -> Option<&'a Path> {
    let name = image_name(image);
    images
        .iter()
        .filter(|(prefix, _)| {
            let prefix = prefix.trim_end_matches('/');
            !prefix.is_empty()
                && (name == prefix
                    || name
                        .strip_prefix(prefix)
                        .is_some_and(|rest| rest.starts_with('/')))
        })
        .max_by_key(|(prefix, _)| prefix.trim_end_matches('/').len())
        .map(|(_, folder)| folder.as_path())
}

/// The executable and its arguments: the command's first word is looked up by file name in
/// the image's folder (images put their binaries anywhere; ours are all in one folder); with
/// no command, the image's entrypoint is taken to be named after the image.
fn executable(
    folder: &Path,
    image: &str,
    command: &[String],
    args: &[String],
) -> (PathBuf, Vec<String>) {
    let (program, lead): (&str, &[String]) = match command.split_first() {
        Some((first, rest)) => (first.rsplit('/').next().unwrap_or(first), rest),
        None => (
            image_name(image).rsplit('/').next().unwrap_or_default(),
            &[],
        ),
    };
    let argv = lead.iter().chain(args).cloned().collect();
    (folder.join(program), argv)
}

/// Kubernetes' `$(VAR)` expansion (`third_party/forked/golang/expansion`): `$(NAME)` becomes
/// the variable's value when it is defined and stays as written when not; `$$` is a literal
/// `$`, so `$$(NAME)` is never expanded.
fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('(') {
            match tail.find(')') {
                Some(close) => {
                    let name = &tail[..close];
                    match lookup(name) {
                        Some(value) => out.push_str(&value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &tail[close + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = tail;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// `value` with a mount path (the longest one that matches) swapped for its local folder,
/// when it is that path or a path below it.
fn rewrite_path(value: &str, mounts: &[(String, PathBuf)]) -> String {
    mounts
        .iter()
        .filter_map(|(mount, local)| {
            let mount = mount.trim_end_matches('/');
            if mount.is_empty() {
                return None;
            }
            let rest = value.strip_prefix(mount)?;
            (rest.is_empty() || rest.starts_with('/')).then_some((mount.len(), local, rest))
        })
        .max_by_key(|(len, _, _)| *len)
        .map_or_else(
            || value.to_string(),
            |(_, local, rest)| format!("{}{rest}", local.display()),
        )
}

/// [`rewrite_path`] for a command-line word, which may also be `--flag=PATH`.
fn rewrite_arg(arg: &str, mounts: &[(String, PathBuf)]) -> String {
    let whole = rewrite_path(arg, mounts);
    if whole != arg {
        return whole;
    }
    match arg.split_once('=') {
        Some((flag, value)) if flag.starts_with('-') => {
            format!("{flag}={}", rewrite_path(value, mounts))
        }
        _ => whole,
    }
}

/// The kubelet's hostname for a pod named `name`: at most 63 characters, without the '-' or
/// '.' a cut can leave at the end.
fn pod_hostname(name: &str) -> String {
    if name.chars().count() <= 63 {
        return name.to_string();
    }
    let cut: String = name.chars().take(63).collect();
    cut.trim_end_matches(['-', '.']).to_string()
}

/// `KUBERNETES_SERVICE_HOST` and `_PORT` for the API server at `server`.
fn service_host_port(server: &str) -> (String, String) {
    let (scheme, rest) = server.split_once("://").unwrap_or(("https", server));
    let authority = rest.split('/').next().unwrap_or_default();
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let default_port = if scheme == "http" { "80" } else { "443" };
    if let Some(bracketed) = authority.strip_prefix('[') {
        if let Some((host, port)) = bracketed.split_once(']') {
            let port = port.strip_prefix(':').filter(|p| !p.is_empty());
            return (host.into(), port.unwrap_or(default_port).into());
        }
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() => (host.into(), port.into()),
        _ => (authority.trim_end_matches(':').into(), default_port.into()),
    }
}

/// A downward-API `fieldRef` value.
fn field_value(pod: &Pod, path: &str, node: &str) -> Result<String, String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let keyed = |prefix: &str| -> Option<String> {
        let inner = path
            .strip_prefix(prefix)?
            .strip_prefix('[')?
            .strip_suffix(']')?;
        let key = inner
            .strip_prefix('\'')
            .and_then(|k| k.strip_suffix('\''))
            .or_else(|| inner.strip_prefix('"').and_then(|k| k.strip_suffix('"')))
            .unwrap_or(inner);
        Some(key.to_string())
    };
    if let Some(key) = keyed("metadata.labels") {
        return Ok(meta
            .labels
            .as_ref()
            .and_then(|l| l.get(&key))
            .cloned()
            .unwrap_or_default());
    }
    if let Some(key) = keyed("metadata.annotations") {
        return Ok(meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(&key))
            .cloned()
            .unwrap_or_default());
    }
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec
            .and_then(|s| s.node_name.clone())
            .unwrap_or_else(|| node.to_string()),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.podIP" | "status.podIPs" | "status.hostIP" | "status.hostIPs" => {
            LOOPBACK.to_string()
        }
        other => return Err(format!("unsupported fieldRef {other:?}")),
    })
}

/// A downward-API `resourceFieldRef` value: the container's own request or limit as written
/// (divisors are not applied), else the node's allocatable for limits and "0" for requests.
fn resource_value(container: &Container, selector: &ResourceFieldSelector) -> String {
    let (kind, resource) = selector
        .resource
        .split_once('.')
        .unwrap_or(("", selector.resource.as_str()));
    let resources = container.resources.as_ref();
    let declared = match kind {
        "limits" => resources.and_then(|r| r.limits.as_ref()),
        "requests" => resources.and_then(|r| r.requests.as_ref()),
        _ => None,
    }
    .and_then(|m| m.get(resource))
    .map(|q| q.0.clone());
    declared.unwrap_or_else(|| match (kind, resource) {
        ("limits", "cpu") => "16".into(),
        ("limits", "memory") => (64u64 << 30).to_string(),
        _ => "0".into(),
    })
}

/// A kubeconfig (JSON, which is YAML) for a pod's service account token.
fn kubeconfig(server: &str, ca_pem: &[u8], token: &str, namespace: &str) -> String {
    // ByteString serialises as base64, the form `certificate-authority-data` takes.
    let ca = serde_json::to_value(ByteString(ca_pem.to_vec())).unwrap_or_default();
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "cluster", "cluster": {
            "server": server,
            "certificate-authority-data": ca,
        }}],
        "users": [{ "name": "pod", "user": { "token": token } }],
        "contexts": [{ "name": "pod", "context": {
            "cluster": "cluster",
            "user": "pod",
            "namespace": namespace,
        }}],
        "current-context": "pod",
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(items: &[&str]) -> Vec<String> {
        items.iter().map(|i| i.to_string()).collect()
    }

    #[test]
    fn image_names_lose_tag_and_digest_but_keep_registry_port() {
        assert_eq!(image_name("ghcr.io/a/trainer:latest"), "ghcr.io/a/trainer");
        assert_eq!(
            image_name("ghcr.io/a/trainer@sha256:abc"),
            "ghcr.io/a/trainer"
        );
        assert_eq!(
            image_name("ghcr.io/a/trainer:v1@sha256:abc"),
            "ghcr.io/a/trainer"
        );
        assert_eq!(
            image_name("localhost:5000/trainer"),
            "localhost:5000/trainer"
        );
        assert_eq!(
            image_name("localhost:5000/trainer:1"),
            "localhost:5000/trainer"
        );
        assert_eq!(image_name("busybox"), "busybox");
    }

    #[test]
    fn images_resolve_by_longest_path_prefix() {
        let images = vec![
            ("ghcr.io/cambrian-dev".to_string(), PathBuf::from("/all")),
            (
                "ghcr.io/cambrian-dev/trainer".to_string(),
                PathBuf::from("/trainer"),
            ),
        ];
        assert_eq!(
            image_folder(&images, "ghcr.io/cambrian-dev/trainer:latest"),
            Some(Path::new("/trainer"))
        );
        assert_eq!(
            image_folder(&images, "ghcr.io/cambrian-dev/operator:0.1.0"),
            Some(Path::new("/all"))
        );
        assert_eq!(
            image_folder(&images, "ghcr.io/cambrian-devx/operator"),
            None
        );
        assert_eq!(image_folder(&images, "docker.io/library/busybox"), None);
    }

    #[test]
    fn executable_comes_from_command_or_image_name() {
        let folder = Path::new("/bin-dir");
        assert_eq!(
            executable(
                folder,
                "ghcr.io/x/trainer:1",
                &s(&["trainer"]),
                &s(&["worker"])
            ),
            (PathBuf::from("/bin-dir/trainer"), s(&["worker"]))
        );
        assert_eq!(
            executable(
                folder,
                "ghcr.io/x/trainer:1",
                &s(&["/usr/local/bin/trainer", "--verbose"]),
                &s(&["worker"])
            ),
            (
                PathBuf::from("/bin-dir/trainer"),
                s(&["--verbose", "worker"])
            )
        );
        assert_eq!(
            executable(
                folder,
                "ghcr.io/x/operator@sha256:0",
                &[],
                &s(&["--http", "x"])
            ),
            (PathBuf::from("/bin-dir/operator"), s(&["--http", "x"]))
        );
    }

    #[test]
    fn expansion_follows_kubernetes() {
        let vars = BTreeMap::from([
            ("A".to_string(), "alpha".to_string()),
            ("B".to_string(), "$(A)".to_string()),
        ]);
        let lookup = |name: &str| vars.get(name).cloned();
        assert_eq!(expand("x-$(A)-y", lookup), "x-alpha-y");
        assert_eq!(expand("$(A)$(A)", lookup), "alphaalpha");
        assert_eq!(expand("$(MISSING)", lookup), "$(MISSING)");
        assert_eq!(expand("$$(A)", lookup), "$(A)");
        assert_eq!(expand("$$$(A)", lookup), "$alpha");
        assert_eq!(expand("cost: $5", lookup), "cost: $5");
        assert_eq!(expand("end$", lookup), "end$");
        assert_eq!(expand("$(A", lookup), "$(A");
        assert_eq!(expand("$()", lookup), "$()");
        // Values are not expanded again.
        assert_eq!(expand("$(B)", lookup), "$(A)");
        assert_eq!(expand("plain", lookup), "plain");
    }

    #[test]
    fn mount_paths_become_local_folders() {
        let mounts = vec![
            ("/var/cache/cambrian".to_string(), PathBuf::from("/w/cache")),
            ("/var/cache".to_string(), PathBuf::from("/w/outer")),
            ("/tmp/".to_string(), PathBuf::from("/w/tmp")),
        ];
        assert_eq!(rewrite_path("/var/cache/cambrian", &mounts), "/w/cache");
        assert_eq!(
            rewrite_path("/var/cache/cambrian/x/y", &mounts),
            "/w/cache/x/y"
        );
        assert_eq!(rewrite_path("/var/cache/other", &mounts), "/w/outer/other");
        assert_eq!(
            rewrite_path("/var/cache/cambrianx", &mounts),
            "/w/outer/cambrianx"
        );
        assert_eq!(rewrite_path("/tmp", &mounts), "/w/tmp");
        assert_eq!(rewrite_path("/tmp/a", &mounts), "/w/tmp/a");
        assert_eq!(rewrite_path("/tmpfoo", &mounts), "/tmpfoo");
        assert_eq!(rewrite_path("--dir=/tmp", &mounts), "--dir=/tmp");
        assert_eq!(rewrite_path("", &mounts), "");
        assert_eq!(rewrite_arg("/tmp/x", &mounts), "/w/tmp/x");
        assert_eq!(rewrite_arg("--dir=/tmp/x", &mounts), "--dir=/w/tmp/x");
        assert_eq!(rewrite_arg("--dir=/elsewhere", &mounts), "--dir=/elsewhere");
        assert_eq!(rewrite_arg("key=/tmp", &mounts), "key=/tmp");
    }

    #[test]
    fn hostnames_are_cut_like_the_kubelet_does() {
        assert_eq!(pod_hostname("short"), "short");
        let exact = "a".repeat(63);
        assert_eq!(pod_hostname(&exact), exact);
        let long = format!("{}-{}", "a".repeat(62), "b".repeat(10));
        assert_eq!(pod_hostname(&long), "a".repeat(62));
        let dots = format!("{}.-.{}", "a".repeat(60), "b".repeat(10));
        assert_eq!(pod_hostname(&dots), "a".repeat(60));
        assert!(pod_hostname(&"x".repeat(100)).len() == 63);
    }

    #[test]
    fn service_address_from_server_url() {
        assert_eq!(
            service_host_port("https://127.0.0.1:6443"),
            ("127.0.0.1".into(), "6443".into())
        );
        assert_eq!(
            service_host_port("https://127.0.0.1:6443/"),
            ("127.0.0.1".into(), "6443".into())
        );
        assert_eq!(
            service_host_port("https://[::1]:6443"),
            ("::1".into(), "6443".into())
        );
        assert_eq!(
            service_host_port("https://kubernetes"),
            ("kubernetes".into(), "443".into())
        );
    }

    #[test]
    fn phases_follow_the_kubelet() {
        use RestartPolicy::*;
        use Summary::*;
        assert_eq!(pod_phase(Never, &[NotStarted]), "Pending");
        assert_eq!(pod_phase(Never, &[Running, NotStarted]), "Pending");
        assert_eq!(pod_phase(Never, &[Running, Exited(1)]), "Running");
        assert_eq!(pod_phase(Never, &[Exited(0), Exited(0)]), "Succeeded");
        assert_eq!(pod_phase(Never, &[Exited(0), Exited(2)]), "Failed");
        assert_eq!(pod_phase(OnFailure, &[Exited(0)]), "Succeeded");
        assert_eq!(pod_phase(OnFailure, &[Exited(1)]), "Running");
        assert_eq!(pod_phase(Always, &[Exited(0)]), "Running");
        assert_eq!(pod_phase(Always, &[]), "Pending");
    }

    #[test]
    fn field_refs() {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                uid: Some("u".into()),
                labels: Some(BTreeMap::from([("app".to_string(), "x".to_string())])),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        };
        let get = |path: &str| field_value(&pod, path, "node");
        assert_eq!(get("metadata.name"), Ok("p".into()));
        assert_eq!(get("metadata.namespace"), Ok("ns".into()));
        assert_eq!(get("metadata.labels['app']"), Ok("x".into()));
        assert_eq!(get("metadata.labels['none']"), Ok(String::new()));
        assert_eq!(get("metadata.annotations['a']"), Ok(String::new()));
        assert_eq!(get("spec.nodeName"), Ok("node".into()));
        assert_eq!(get("status.podIP"), Ok("127.0.0.1".into()));
        assert!(get("spec.bogus").is_err());
    }

    #[test]
    fn kubeconfig_carries_base64_ca() {
        let text = kubeconfig("https://127.0.0.1:1", b"PEM", "tok", "ns");
        let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        assert_eq!(
            value["clusters"][0]["cluster"]["certificate-authority-data"],
            "UEVN"
        );
        assert_eq!(value["users"][0]["user"]["token"], "tok");
        assert_eq!(value["contexts"][0]["context"]["namespace"], "ns");
    }
}
