//! The Helm chart under `helm/mediacache`: `helm lint --strict` and `helm template` on the
//! default values and on every values file under `ci/`, with the rendered objects checked for
//! what operators rely on, the rendered config run through `mediacache check-config`, managed
//! shards scaled through the ring code, and the values schema refusing wrong values.
//!
//! `helm` comes from the PATH, or `$HELM`; `scripts/test.sh` installs it when it is missing.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use mediacache::config::Config;
use mediacache::ring::Placement;
use serde::Deserialize;
use yaml_serde::Value;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/helm/mediacache");

fn helm() -> Command {
    let helm = std::env::var_os("HELM").unwrap_or_else(|| "helm".into());
    let mut cmd = Command::new(&helm);
    cmd.stdin(Stdio::null());
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| {
        panic!("cannot run helm ({e}): run the suite with ./scripts/test.sh, which installs it")
    })
}

fn ci_values() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(Path::new(CHART).join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "ci values files: {files:?}");
    files
}

/// Every case: the default values, then each ci values file.
fn cases() -> Vec<Option<PathBuf>> {
    std::iter::once(None)
        .chain(ci_values().into_iter().map(Some))
        .collect()
}

fn name(case: &Option<PathBuf>) -> String {
    case.as_ref().map_or("default values".into(), |p| {
        p.file_name().unwrap().to_string_lossy().into_owned()
    })
}

/// The chart rendered as text; `Err` holds helm's stderr.
fn template_text(values: Option<&Path>, set: &[&str]) -> Result<String, String> {
    let mut cmd = helm();
    cmd.args(["template", "rel", CHART, "--namespace", "media"]);
    if let Some(v) = values {
        cmd.arg("-f").arg(v);
    }
    for s in set {
        cmd.args(["--set", s]);
    }
    let out = run(&mut cmd);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8(out.stdout).unwrap())
}

/// Renders the chart; `Err` holds helm's stderr.
fn template(values: Option<&Path>, set: &[&str]) -> Result<Vec<Value>, String> {
    let text = template_text(values, set)?;
    let mut docs = Vec::new();
    for doc in yaml_serde::Deserializer::from_str(&text) {
        let value = Value::deserialize(doc).expect("helm template renders valid YAML");
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn render(values: Option<&Path>, set: &[&str]) -> Vec<Value> {
    template(values, set).unwrap_or_else(|e| panic!("helm template failed: {e}"))
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = find(docs, kind);
    assert_eq!(found.len(), 1, "expected one {kind}");
    found[0]
}

fn config_text(docs: &[Value]) -> String {
    one(docs, "ConfigMap")["data"]["config.yaml"]
        .as_str()
        .expect("ConfigMap has config.yaml")
        .to_owned()
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

#[test]
fn lint_strict_passes_on_every_values_file() {
    for case in cases() {
        let mut cmd = helm();
        cmd.args(["lint", "--strict", CHART]);
        if let Some(v) = &case {
            cmd.arg("-f").arg(v);
        }
        let out = run(&mut cmd);
        assert!(
            out.status.success(),
            "helm lint --strict, {}: {}{}",
            name(&case),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// API groups of the custom resources the chart may render (the ServiceMonitor), which have no
/// schema in the Kubernetes API.
const CRD_GROUPS: &[&str] = &["monitoring.coreos.com"];

/// `kubernetes-validate` (PyPI), from `$KUBERNETES_VALIDATE` or the PATH.
fn kubernetes_validate() -> Command {
    let program = std::env::var_os("KUBERNETES_VALIDATE").unwrap_or("kubernetes-validate".into());
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null());
    cmd
}

fn validate_output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run kubernetes-validate ({e}): run the suite with ./scripts/test.sh, which \
             installs it"
        )
    })
}

/// The minor versions of `major.minor` in `text` (e.g. `">=1.30.0-0"` → 30).
fn minor_of(text: &str) -> u32 {
    let digits = text.trim_start_matches(|c: char| !c.is_ascii_digit());
    let mut parts = digits.split(['.', '-']);
    assert_eq!(
        parts.next(),
        Some("1"),
        "a Kubernetes 1.x version: {text:?}"
    );
    parts
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no minor in {text:?}"))
}

#[test]
fn rendered_objects_are_valid_for_every_supported_kubernetes_version() {
    // From the chart's own kubeVersion floor up to the newest API the validator knows (its
    // version is the Kubernetes version of its newest schemas).
    let chart: Value = yaml_serde::from_str(
        &std::fs::read_to_string(Path::new(CHART).join("Chart.yaml")).unwrap(),
    )
    .unwrap();
    let oldest = minor_of(str_of(&chart["kubeVersion"]));
    let version = validate_output(kubernetes_validate().arg("--version"));
    let newest = minor_of(&String::from_utf8_lossy(&version.stdout));
    assert!(
        oldest <= newest,
        "kubernetes-validate knows 1.{newest}, the chart needs 1.{oldest}"
    );
    let dir = tempfile::tempdir().unwrap();
    for case in cases() {
        let rendered = dir
            .path()
            .join(format!("{}.yaml", name(&case).replace(' ', "-")));
        let text = template_text(case.as_deref(), &[])
            .unwrap_or_else(|e| panic!("helm template failed: {e}"));
        std::fs::write(&rendered, text).unwrap();
        for minor in oldest..=newest {
            let out = validate_output(
                kubernetes_validate()
                    .args(["--strict", "--quiet", "--kubernetes-version"])
                    .arg(format!("1.{minor}.0"))
                    .arg(&rendered),
            );
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{} against Kubernetes 1.{minor}: {said}{}",
                name(&case),
                String::from_utf8_lossy(&out.stderr)
            );
            // An object the validator has no schema for only warns: fine for the CRDs the chart
            // may render, a failure for anything else (an API version this Kubernetes removed).
            for warning in said.lines().filter(|l| l.starts_with("WARN")) {
                assert!(
                    CRD_GROUPS
                        .iter()
                        .any(|g| warning.contains(&format!("api version {g}/"))),
                    "{} against Kubernetes 1.{minor}: {warning}",
                    name(&case)
                );
            }
        }
    }
}

#[test]
fn rendered_config_passes_check_config() {
    for case in cases() {
        let docs = render(case.as_deref(), &[]);
        let text = config_text(&docs);
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_mediacache"))
            .arg("check-config")
            .arg(file.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: check-config refused the rendered config:\n{}\n{text}",
            name(&case),
            String::from_utf8_lossy(&out.stderr)
        );
        // The service listens where the Service and the probes point.
        let config = Config::from_yaml(&text).unwrap().config;
        let deployment = one(&docs, "Deployment");
        let ports = &deployment["spec"]["template"]["spec"]["containers"][0]["ports"];
        let port = |n: &str| {
            ports
                .as_sequence()
                .unwrap()
                .iter()
                .find(|p| p["name"].as_str() == Some(n))
                .and_then(|p| p["containerPort"].as_u64())
                .unwrap()
        };
        assert_eq!(u64::from(config.listen.port()), port("grpc"));
        assert_eq!(
            u64::from(config.metrics_listen.expect("metrics on").port()),
            port("metrics")
        );
        assert!(
            config.listen.ip().is_unspecified(),
            "reachable from the pod network"
        );
    }
}

#[test]
fn deployment_is_hardened_probed_and_mounts_config_as_a_directory() {
    for case in cases() {
        let docs = render(case.as_deref(), &[]);
        let case = name(&case);
        let deployment = one(&docs, "Deployment");
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];

        // No subPath anywhere: a subPath mount never receives ConfigMap or Secret updates.
        for c in pod["containers"].as_sequence().unwrap() {
            for m in c["volumeMounts"].as_sequence().unwrap() {
                assert!(m.get("subPath").is_none(), "{case}: subPath on {m:?}");
            }
        }
        let config_volume = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"].as_str() == Some("config"))
            .unwrap();
        assert!(config_volume.get("configMap").is_some(), "{case}");
        let args: Vec<&str> = container["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(str_of)
            .collect();
        let mount = container["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["name"].as_str() == Some("config"))
            .unwrap();
        assert_eq!(
            args,
            [
                "serve",
                "--config",
                &format!("{}/config.yaml", str_of(&mount["mountPath"]))
            ],
            "{case}"
        );

        // Probes on the service's health endpoints, and a drain that fits the grace period.
        assert_eq!(
            str_of(&container["readinessProbe"]["httpGet"]["path"]),
            "/readyz"
        );
        assert_eq!(
            str_of(&container["livenessProbe"]["httpGet"]["path"]),
            "/healthz"
        );
        let config = Config::from_yaml(&config_text(&docs)).unwrap().config;
        let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_u64()
            .unwrap();
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(
            grace > pre_stop + config.shutdown_grace.as_secs(),
            "{case}: grace {grace} s must cover preStop {pre_stop} s + drain {:?}",
            config.shutdown_grace
        );

        // Security context.
        assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
        let sc = &container["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{case}");
        assert_eq!(
            sc["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{case}"
        );
        assert_eq!(
            sc["capabilities"]["drop"].as_sequence().unwrap(),
            &vec![Value::from("ALL")],
            "{case}"
        );

        // The Service: a named gRPC port with appProtocol, and the metrics port.
        let service = find(&docs, "Service")
            .into_iter()
            .find(|s| s["spec"]["clusterIP"].as_str() != Some("None"))
            .unwrap();
        let ports = service["spec"]["ports"].as_sequence().unwrap();
        assert!(ports.iter().any(
            |p| p["name"].as_str() == Some("grpc") && p["appProtocol"].as_str() == Some("grpc")
        ));
        assert!(ports.iter().any(|p| p["name"].as_str() == Some("metrics")));
        for kind in ["ServiceAccount", "PodDisruptionBudget"] {
            one(&docs, kind);
        }
        let test_pod = find(&docs, "Pod");
        assert_eq!(test_pod.len(), 1, "{case}: the helm test pod");
        assert_eq!(
            str_of(&test_pod[0]["metadata"]["annotations"]["helm.sh/hook"]),
            "test"
        );
        assert_eq!(
            str_of(&test_pod[0]["spec"]["containers"][0]["args"][0]),
            "smoke"
        );
    }
}

/// The pod template of the Deployment as text, to compare two renders.
fn pod_template(docs: &[Value]) -> String {
    yaml_serde::to_string(&one(docs, "Deployment")["spec"]["template"]).unwrap()
}

#[test]
fn shard_edits_do_not_restart_pods_but_restart_settings_do() {
    let base = render(None, &[]);
    let edited = render(
        None,
        &[
            "shards[0].name=added",
            "shards[0].url=redis://10.1.2.3:6379",
            "config.failover=next",
            "config.redis.pool_size=8",
        ],
    );
    assert_ne!(config_text(&base), config_text(&edited));
    assert_eq!(
        pod_template(&base),
        pod_template(&edited),
        "a shard, failover or redis edit must not change the pod template"
    );
    let managed = render(None, &["redisShards.enabled=true", "redisShards.count=5"]);
    assert_eq!(pod_template(&base), pod_template(&managed));

    for restart in [
        "service.grpcPort=7000",
        "config.memory.max_bytes=1000000",
        "shutdownGraceSeconds=40",
    ] {
        let changed = render(None, &[restart]);
        let checksum = |docs: &[Value]| {
            one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
                ["checksum/restart-settings"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert_ne!(
            checksum(&base),
            checksum(&changed),
            "{restart} rolls the pods"
        );
    }
}

#[test]
fn secrets_are_referenced_never_inlined() {
    let values = Path::new(CHART).join("ci/auth-tls-values.yaml");
    let docs = render(Some(&values), &[]);
    assert!(
        find(&docs, "Secret").is_empty(),
        "the chart renders no Secret"
    );
    let text = config_text(&docs);
    let config = Config::from_yaml(&text).unwrap().config;
    assert_eq!(config.auth.token_files.len(), 2);
    assert_eq!(config.auth.read_only_token_files.len(), 1);
    let tls = config.tls.as_ref().expect("tls configured");
    assert!(tls.client_ca_file.is_some());
    assert_eq!(config.redis.username.as_deref(), Some("mediacache"));
    assert!(!text.contains("password:"), "no inline password:\n{text}");
    for shard in &config.shards {
        assert!(url::Url::parse(&shard.url).unwrap().password().is_none());
    }

    // Every file the config names is inside a mount of a Secret volume.
    let pod = &one(&docs, "Deployment")["spec"]["template"]["spec"];
    let secret_volumes: BTreeMap<&str, &str> = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| Some((v["name"].as_str()?, v["secret"]["secretName"].as_str()?)))
        .collect();
    let mounts: Vec<(&str, &str)> = pod["containers"][0]["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|m| secret_volumes.contains_key(str_of(&m["name"])))
        .map(|m| (str_of(&m["mountPath"]), secret_volumes[str_of(&m["name"])]))
        .collect();
    let mut files: Vec<&Path> = config
        .auth
        .token_files
        .iter()
        .map(PathBuf::as_path)
        .collect();
    files.extend(
        config
            .auth
            .read_only_token_files
            .iter()
            .map(PathBuf::as_path),
    );
    files.extend([tls.cert_file.as_path(), tls.key_file.as_path()]);
    files.extend(tls.client_ca_file.as_deref());
    files.extend(config.redis.password_file.as_deref());
    files.extend(config.redis.tls_ca_file.as_deref());
    assert!(config.shards.iter().any(|s| s.url.starts_with("rediss://")));
    for file in files {
        assert!(
            mounts.iter().any(|(dir, _)| file.starts_with(dir)),
            "{} is not under a Secret mount ({mounts:?})",
            file.display()
        );
    }
    let names: Vec<&str> = secret_volumes.values().copied().collect();
    for secret in [
        "mediacache-redis",
        "mediacache-tokens",
        "mediacache-readers",
        "mediacache-tls",
        "cache-redis-ca",
    ] {
        assert!(names.contains(&secret), "{secret} not mounted: {names:?}");
    }

    // The managed shards take the password from the same Secret, through the environment and
    // stdin, never from their arguments.
    let redis = one(&docs, "StatefulSet");
    let container = &redis["spec"]["template"]["spec"]["containers"][0];
    let env = container["env"].as_sequence().unwrap();
    assert!(env
        .iter()
        .any(|e| e["name"].as_str() == Some("REDIS_PASSWORD")
            && e["valueFrom"]["secretKeyRef"]["name"].as_str() == Some("mediacache-redis")));

    // The test pod authenticates and verifies TLS.
    let test_args =
        yaml_serde::to_string(&one(&docs, "Pod")["spec"]["containers"][0]["args"]).unwrap();
    for flag in ["--token-file", "--tls-ca-file", "https://"] {
        assert!(test_args.contains(flag), "{flag} in {test_args}");
    }
}

/// The managed shards' ring names and the shard list, from a render.
fn shard_names(docs: &[Value]) -> Vec<String> {
    Config::from_yaml(&config_text(docs))
        .unwrap()
        .config
        .shards
        .into_iter()
        .map(|s| s.name)
        .collect()
}

#[test]
fn managed_shards_follow_the_seed_and_scale_moving_a_quarter_of_keys() {
    let three = render(None, &["redisShards.enabled=true", "redisShards.count=3"]);
    let four = render(None, &["redisShards.enabled=true", "redisShards.count=4"]);
    let (names3, names4) = (shard_names(&three), shard_names(&four));
    assert_eq!(names3, ["redis-0", "redis-1", "redis-2"]);
    assert_eq!(
        &names4[..3],
        &names3[..],
        "existing shards keep their names"
    );

    let ring3 = Placement::new(names3.iter().map(|n| (n.as_str(), 1)));
    let ring4 = Placement::new(names4.iter().map(|n| (n.as_str(), 1)));
    let keys = 10_000;
    let mut moved = 0;
    for i in 0..keys {
        let key = format!("example.org/media-{i:05}");
        let (before, after) = (ring3.owner(&key).unwrap(), ring4.owner(&key).unwrap());
        if before != after {
            assert_eq!(after, 3, "a key may only move to the new shard");
            moved += 1;
        }
    }
    let share = moved as f64 / keys as f64;
    println!(
        "3 -> 4 managed shards: {moved} of {keys} sample keys moved ({:.1}%)",
        share * 100.0
    );
    assert!(share <= 0.27, "moved {share}");
    assert!(
        share >= 0.20,
        "the new shard takes its share, moved {share}"
    );

    // One StatefulSet pod per shard, addressed through a headless Service.
    let set = one(&four, "StatefulSet");
    assert_eq!(set["spec"]["replicas"].as_u64(), Some(4));
    let headless = find(&four, "Service")
        .into_iter()
        .find(|s| s["spec"]["clusterIP"].as_str() == Some("None"))
        .expect("headless Service");
    assert_eq!(
        set["spec"]["serviceName"].as_str(),
        headless["metadata"]["name"].as_str()
    );
    let urls: Vec<String> = Config::from_yaml(&config_text(&four))
        .unwrap()
        .config
        .shards
        .into_iter()
        .map(|s| s.url)
        .collect();
    let svc = str_of(&headless["metadata"]["name"]);
    assert_eq!(
        urls[3],
        format!("redis://{svc}-3.{svc}.media.svc.cluster.local:6379")
    );
}

/// Kills a child's whole process group when dropped, also when a test fails.
struct KillGroup(Child);

impl Drop for KillGroup {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.0.id())])
            .status();
        let _ = self.0.wait();
    }
}

#[test]
fn managed_shard_redis_config_starts_a_real_redis_server() {
    // The StatefulSet feeds redis-server its config on stdin; run that same script here (on a
    // loopback port) and check what the seed asks for: maxmemory >= 1gb, allkeys-lfu, no
    // persistence, and the password required.
    let docs = render(
        None,
        &[
            "redisShards.enabled=true",
            "redisAuth.existingSecret=redis-secret",
            "redisAuth.username=mediacache",
        ],
    );
    let container = &one(&docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0];
    let command: Vec<&str> = container["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(str_of)
        .collect();
    assert_eq!(&command[..2], ["sh", "-c"]);
    let port = common::free_port();
    let dir = tempfile::tempdir().unwrap();
    let script = command[2]
        .replace("echo 'port 6379'", &format!("echo 'port {port}'"))
        .replace("echo 'bind * -::*'", "echo 'bind 127.0.0.1'")
        .replace(
            "echo 'dir /data'",
            &format!("echo 'dir {}'", dir.path().display()),
        );
    assert_ne!(script, command[2]);
    // Its own process group: redis-server runs as a child of the shell's pipeline, and the
    // whole group is killed at the end.
    let server = Command::new("sh")
        .args(["-c", &script])
        .env("REDIS_PASSWORD", "pw-from-secret")
        .env("REDIS_USERNAME", "mediacache")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let server = KillGroup(server);
    let cli = |args: &[&str]| {
        Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let auth = [
        "--user",
        "mediacache",
        "--pass",
        "pw-from-secret",
        "--no-auth-warning",
    ];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while cli(&[&auth[..], &["PING"]].concat()) != "PONG" {
        assert!(
            std::time::Instant::now() < deadline,
            "redis-server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let get = |name: &str| cli(&[&auth[..], &["CONFIG", "GET", name]].concat());
    let maxmemory: u64 = get("maxmemory").lines().nth(1).unwrap().parse().unwrap();
    let policy = get("maxmemory-policy");
    let save = get("save");
    let aof = get("appendonly");
    let anonymous = cli(&["PING"]);
    drop(server);
    assert!(maxmemory >= 1 << 30, "maxmemory {maxmemory}");
    assert!(policy.ends_with("allkeys-lfu"), "{policy}");
    assert_eq!(
        save.lines().nth(1).unwrap_or(""),
        "",
        "no RDB snapshots: {save}"
    );
    assert!(aof.ends_with("no"), "{aof}");
    assert!(
        anonymous.contains("NOAUTH"),
        "the default user is off: {anonymous}"
    );
    // The password is not in the pod spec's command.
    assert!(!command[2].contains("pw-from-secret"));
}

#[test]
fn wrong_values_fail_with_the_schema_message() {
    let err = template(None, &["replicaCount=two"]).unwrap_err();
    assert!(
        err.contains("replicaCount") && err.contains("want integer"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(&values, "shards:\n  - url: redis://10.0.0.1:6379\n").unwrap();
    let err = template(Some(&values), &[]).unwrap_err();
    assert!(err.contains("/shards/0") && err.contains("name"), "{err}");

    let err = template(None, &["config.failover=sometimes"]).unwrap_err();
    assert!(err.contains("/config/failover"), "{err}");
    let err = template(None, &["config.chunk_bytes=12"]).unwrap_err();
    assert!(err.contains("/config/chunk_bytes"), "{err}");
    let err = template(None, &["config.memory.max_byte=1"]).unwrap_err();
    assert!(err.contains("max_byte"), "a misspelt key is refused: {err}");

    // Two shards with one name: the template refuses it, naming the shard.
    std::fs::write(
        &values,
        "redisShards: { enabled: true, count: 2 }\nshards:\n  - { name: redis-1, url: \"redis://10.0.0.1:6379\" }\n",
    )
    .unwrap();
    let err = template(Some(&values), &[]).unwrap_err();
    assert!(err.contains("\"redis-1\" is used twice"), "{err}");
}

#[test]
fn notes_tell_how_to_reach_watch_and_edit() {
    let out = run(helm().args([
        "install",
        "cache",
        CHART,
        "--namespace",
        "media",
        "--dry-run=client",
        "--set",
        "redisShards.enabled=true",
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let notes = &text[text.find("NOTES:").expect("NOTES rendered")..];
    for needle in [
        "http://cache-mediacache.media.svc.cluster.local:50051",
        "helm test cache --namespace media",
        "/metrics",
        "kubectl --namespace media edit configmap cache-mediacache",
        "Shards (3 in the ring)",
        "redisShards.count=N",
    ] {
        assert!(notes.contains(needle), "NOTES lack {needle:?}:\n{notes}");
    }
}
