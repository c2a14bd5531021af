//! One worker process per upstream: spawned as `regcache worker`, watched,
//! restarted with back-off, stopped with the supervisor.
//!
//! SECURITY: a worker's environment is the supervisor's minus `CONFIG` and
//! `CONFIG_FILE` (which hold every upstream's variables), plus its own
//! entry's `variables`. It never sees another upstream's credentials.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::config::Upstream;

/// Variables that carry every upstream's settings and must not reach workers.
const WITHHELD: [&str; 2] = ["CONFIG", "CONFIG_FILE"];
/// How long a worker may take to say READY.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A worker that ran this long before dying restarts without delay.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// What the supervisor knows about one worker.
#[derive(Debug)]
pub struct Worker {
    pub upstream: Upstream,
    pub socket: PathBuf,
    pub storage: PathBuf,
    ready: AtomicBool,
    ready_tx: watch::Sender<bool>,
}

impl Worker {
    pub fn new(upstream: Upstream, socket: PathBuf, storage: PathBuf) -> Self {
        Worker {
            upstream,
            socket,
            storage,
            ready: AtomicBool::new(false),
            ready_tx: watch::channel(false).0,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Marks the worker ready or not (the supervisor does, from its READY line).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
        self.ready_tx.send_replace(ready);
    }

    /// Resolves once the worker has said READY (or at once if it has).
    pub async fn wait_ready(&self) {
        let mut rx = self.ready_tx.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }
}

/// The variables that carry an upstream's credentials.
const CREDENTIALS: [&str; 4] = [
    "REGISTRY_PROXY_USERNAME",
    "REGISTRY_PROXY_USERNAME_FILE",
    "REGISTRY_PROXY_PASSWORD",
    "REGISTRY_PROXY_PASSWORD_FILE",
];
/// Which upstreams get credentials set in the supervisor's own environment.
const INHERIT: &str = "REGCACHE_INHERIT_CREDENTIALS";

/// Does `up` take credentials from the supervisor's own environment?
/// `REGCACHE_INHERIT_CREDENTIALS`: `all` (the default, as lhns does), `none`,
/// or a comma-separated list of upstream names or aliases.
fn inherits_credentials(policy: Option<&str>, up: &Upstream) -> bool {
    match policy.map(str::trim) {
        None | Some("") | Some("all") => true,
        Some("none") => false,
        Some(list) => {
            let names = up.names();
            list.split(',')
                .any(|n| names.contains(&n.trim().to_ascii_lowercase()))
        }
    }
}

/// Which upstreams receive credentials from the supervisor's environment
/// (none has its own): said at start and by `check-config`, since one
/// registry's password offered to another is a leak.
pub fn inherited_credentials(
    inherited: &[(String, String)],
    upstreams: &[Upstream],
) -> Vec<String> {
    let get = |k: &str| {
        inherited
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    };
    if !CREDENTIALS
        .iter()
        .any(|c| get(c).is_some_and(|v| !v.is_empty()))
    {
        return Vec::new();
    }
    upstreams
        .iter()
        .filter(|up| inherits_credentials(get(INHERIT), up))
        .filter(|up| !CREDENTIALS.iter().any(|c| up.variables.contains_key(*c)))
        .map(Upstream::name)
        .collect()
}

/// The environment of `up`'s worker, from the supervisor's own `inherited`.
pub fn worker_env(
    inherited: impl IntoIterator<Item = (String, String)>,
    up: &Upstream,
) -> BTreeMap<String, String> {
    let inherited: Vec<(String, String)> = inherited.into_iter().collect();
    let policy = inherited
        .iter()
        .find(|(k, _)| k == INHERIT)
        .map(|(_, v)| v.clone());
    let inherit = inherits_credentials(policy.as_deref(), up);
    let mut env: BTreeMap<String, String> = inherited
        .into_iter()
        .filter(|(k, _)| !WITHHELD.contains(&k.as_str()))
        .filter(|(k, _)| inherit || !CREDENTIALS.contains(&k.as_str()))
        .collect();
    env.extend(up.variables.clone());
    env.insert(
        "REGCACHE_SUPERVISOR_PID".into(),
        std::process::id().to_string(),
    );
    env
}

/// How often the front records a use of `up`'s content, as its worker does
/// (`None`: not at all).
pub fn touch_every(inherited: &[(String, String)], up: &Upstream) -> Option<std::time::Duration> {
    let env = worker_env(inherited.iter().cloned(), up);
    let get = |k: &str| env.get(k).cloned();
    let policy = regcache_worker::config::policy_from(&get).unwrap_or_default();
    regcache_worker::config::record_use_from(&get).then(|| policy.touch_every())
}

/// Checks, before anything starts, what each worker would refuse at start
/// (credential files it cannot read, half a username/password pair, a bad
/// duration, an unknown storage driver): a worker failing on these would
/// only restart in a loop.
pub fn check_worker_env(
    inherited: &[(String, String)],
    upstreams: &[Upstream],
) -> Result<(), crate::config::Error> {
    for up in upstreams {
        let env = worker_env(inherited.iter().cloned(), up);
        regcache_worker::config::check_env(&|k| env.get(k).cloned()).map_err(|e| {
            crate::config::Error {
                item: Some(up.index),
                reason: format!("{}: {e}", up.name()),
            }
        })?;
    }
    Ok(())
}

fn command(exe: &Path, w: &Worker) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg("worker")
        .arg("--upstream")
        .arg(w.upstream.url())
        .arg("--storage")
        .arg(&w.storage)
        .arg("--socket")
        .arg(&w.socket)
        .env_clear()
        .envs(worker_env(std::env::vars(), &w.upstream))
        .env("REGCACHE_NODE_ID", crate::peer::node_id())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    cmd
}

/// Keeps `w` running until `stop` turns true, then stops it (SIGTERM, and
/// SIGKILL after `grace`).
pub async fn supervise(
    exe: PathBuf,
    w: Arc<Worker>,
    metrics: Arc<crate::metrics::Metrics>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let name = w.upstream.name();
    // Zero from the start, so that dashboards and alerts see the series.
    metrics.worker_restarts.with_label_values(&[&name]);
    let mut backoff = BACKOFF_MIN;
    loop {
        if *stop.borrow() {
            return;
        }
        let started = Instant::now();
        let mut child = match command(&exe, &w).spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(upstream = %name, error = %e, "cannot start worker");
                sleep_or_stop(&mut stop, backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let pid = child.id().unwrap_or(0);
        tracing::info!(upstream = %name, pid, "worker started");
        let stdout = child.stdout.take();
        let readiness = async {
            let mut lines = BufReader::new(stdout?).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.trim() == "READY" {
                    // Keep draining so the worker never blocks on a full pipe.
                    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                    return Some(());
                }
            }
            None
        };
        tokio::select! {
            r = tokio::time::timeout(READY_TIMEOUT, readiness) => match r {
                Ok(Some(())) => w.set_ready(true),
                _ => {
                    tracing::error!(upstream = %name, pid, "worker did not become ready; restarting it");
                    let _ = child.kill().await;
                }
            },
            _ = stop.changed() => {
                terminate(&mut child, grace).await;
                return;
            }
        }
        let status = tokio::select! {
            s = child.wait() => s,
            _ = stop.changed() => {
                terminate(&mut child, grace).await;
                w.set_ready(false);
                return;
            }
        };
        w.set_ready(false);
        if *stop.borrow() {
            return;
        }
        metrics.worker_restarts.with_label_values(&[&name]).inc();
        tracing::error!(upstream = %name, pid, status = ?status.ok(), "worker exited; restarting");
        if started.elapsed() > STABLE_AFTER {
            backoff = BACKOFF_MIN;
        }
        sleep_or_stop(&mut stop, backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = stop.changed() => {}
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL.
async fn terminate(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    #[test]
    fn worker_env_problems_are_found_before_start() {
        let ups = config::parse(
            r#"["ok.io",
                {"registry": "b.io", "variables": {"REGISTRY_PROXY_USERNAME": "u",
                  "REGISTRY_PROXY_PASSWORD_FILE": "/nonexistent/pw"}}]"#,
        )
        .unwrap();
        let e = check_worker_env(&[], &ups).unwrap_err();
        assert_eq!(e.item, Some(1));
        assert!(
            e.reason.contains("b.io") && e.reason.contains("/nonexistent/pw"),
            "{e}"
        );
        let s3 = [("REGISTRY_STORAGE".to_string(), "s3".to_string())];
        let e = check_worker_env(&s3, &ups[..1]).unwrap_err();
        assert!(e.reason.contains("REGISTRY_STORAGE_S3_BUCKET"), "{e}");
        let half = [("REGISTRY_PROXY_USERNAME".to_string(), "u".to_string())];
        assert!(check_worker_env(&half, &ups[..1]).is_err());
        assert!(check_worker_env(&[], &ups[..1]).is_ok());
    }

    #[test]
    fn inherited_credentials_are_said_and_can_be_limited() {
        let ups = config::parse(
            r#"["docker.io", "ghcr.io",
                {"registry": "quay.io", "variables": {"REGISTRY_PROXY_USERNAME": "q", "REGISTRY_PROXY_PASSWORD": "qp"}}]"#,
        )
        .unwrap();
        let creds = |policy: Option<&str>| {
            let mut env = vec![
                ("REGISTRY_PROXY_USERNAME".to_string(), "hub".to_string()),
                ("REGISTRY_PROXY_PASSWORD".to_string(), "hubpw".to_string()),
            ];
            if let Some(p) = policy {
                env.push((INHERIT.to_string(), p.to_string()));
            }
            env
        };
        assert_eq!(
            inherited_credentials(&creds(None), &ups),
            ["registry-1.docker.io", "ghcr.io"]
        );
        assert_eq!(
            inherited_credentials(&creds(Some("docker.io")), &ups),
            ["registry-1.docker.io"]
        );
        assert!(inherited_credentials(&creds(Some("none")), &ups).is_empty());
        assert!(inherited_credentials(&[], &ups).is_empty());
        let ghcr = worker_env(creds(Some("docker.io")), &ups[1]);
        assert!(
            !ghcr.contains_key("REGISTRY_PROXY_PASSWORD"),
            "ghcr.io got Docker Hub's password"
        );
        let hub = worker_env(creds(Some("docker.io")), &ups[0]);
        assert_eq!(hub["REGISTRY_PROXY_PASSWORD"], "hubpw");
        let quay = worker_env(creds(Some("none")), &ups[2]);
        assert_eq!(
            quay["REGISTRY_PROXY_PASSWORD"], "qp",
            "its own variables always apply"
        );
    }

    #[test]
    fn env_contract() {
        let ups = config::parse(
            r#"[{"registry": "a.io", "variables": {"REGISTRY_PROXY_PASSWORD": "pa", "SHARED": "mine"}},
                {"registry": "b.io", "variables": {"REGISTRY_PROXY_PASSWORD": "pb"}}]"#,
        )
        .unwrap();
        let inherited = vec![
            ("CONFIG".to_string(), "[...pa...pb...]".to_string()),
            ("CONFIG_FILE".to_string(), "/run/config".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
            ("SHARED".to_string(), "global".to_string()),
        ];
        let a = worker_env(inherited.clone(), &ups[0]);
        assert_eq!(a["REGISTRY_PROXY_PASSWORD"], "pa");
        assert_eq!(
            a["SHARED"], "mine",
            "variables win over the inherited environment"
        );
        assert_eq!(a["PATH"], "/bin");
        assert!(!a.contains_key("CONFIG") && !a.contains_key("CONFIG_FILE"));
        let b = worker_env(inherited, &ups[1]);
        assert_eq!(b["REGISTRY_PROXY_PASSWORD"], "pb");
        assert!(!b.values().any(|v| v.contains("pa")));
    }
}
