//! `regcache gc` and `regcache fsck`: the cache policy and the integrity
//! check run on each upstream's storage from the command line.
//!
//! A storage root a running worker holds is its worker's to change: there
//! `gc --dry-run` and `fsck --dry-run` still report (they only read); `gc`
//! says the worker collects by itself, `fsck` checks without removing.

use std::path::PathBuf;
use std::sync::Arc;

use regcache_store::policy::{self, Policy};
use regcache_store::{FsStore, FsckReport, Managed, Report};
use serde::Serialize;

use crate::settings::Settings;
use crate::workers;

/// One upstream's outcome.
#[derive(Debug, Serialize)]
pub struct Outcome<T> {
    pub upstream: String,
    pub storage: PathBuf,
    /// Held by a running regcache: nothing was changed.
    pub in_use: bool,
    pub policy: String,
    pub result: Option<T>,
    pub note: Option<String>,
}

impl<T> Outcome<T> {
    fn new(upstream: String, storage: &std::path::Path) -> Outcome<T> {
        Outcome {
            upstream,
            storage: storage.to_owned(),
            in_use: false,
            policy: String::new(),
            result: None,
            note: None,
        }
    }
}

/// One upstream's storage, its lock when free, and its worker's policy.
struct Root {
    upstream: String,
    path: PathBuf,
    lock: Option<regcache_store::RootLock>,
    policy: Result<Policy, String>,
}

fn roots(settings: &Settings) -> Vec<Root> {
    let inherited: Vec<(String, String)> = std::env::vars().collect();
    settings
        .upstreams
        .iter()
        .map(|up| {
            let root = settings.storage_of(up);
            let env = workers::worker_env(inherited.iter().cloned(), up);
            let policy = regcache_worker::config::policy_from(&|k| env.get(k).cloned())
                .map_err(|e| e.to_string());
            let lock = if root.is_dir() {
                FsStore::lock(&root).ok().flatten()
            } else {
                None
            };
            Root {
                upstream: up.name(),
                path: root,
                lock,
                policy,
            }
        })
        .collect()
}

/// Applies (or, `dry_run`, shows) each upstream's policy.
pub fn gc(settings: &Settings, dry_run: bool) -> Vec<Outcome<Report>> {
    roots(settings)
        .into_iter()
        .map(
            |Root {
                 upstream,
                 path: root,
                 lock,
                 policy,
             }| {
                let mut out = Outcome::new(upstream, &root);
                let policy = match policy {
                    Ok(p) => p,
                    Err(e) => {
                        out.note = Some(e);
                        return out;
                    }
                };
                out.policy = policy.describe();
                if !root.is_dir() {
                    out.note = Some("nothing cached yet".into());
                    return out;
                }
                out.in_use = lock.is_none();
                if out.in_use && !dry_run {
                    out.note = Some(
                    "in use by a running regcache, whose worker applies this policy by itself; \
                     --dry-run shows what it would remove now"
                        .into(),
                );
                    return out;
                }
                let store = if out.in_use {
                    FsStore::view(&root)
                } else {
                    match FsStore::open(&root) {
                        Ok(s) => s,
                        Err(e) => {
                            out.note = Some(e.to_string());
                            return out;
                        }
                    }
                };
                let managed = Managed::new(Arc::new(store.clone()), store, policy);
                managed.build_index();
                out.result = Some(if dry_run {
                    managed.dry_run()
                } else {
                    managed.sweep()
                });
                drop(lock);
                out
            },
        )
        .collect()
}

/// Checks every upstream's storage, removing what is bad unless `dry_run`
/// or in use.
pub fn fsck(settings: &Settings, dry_run: bool) -> Vec<Outcome<FsckReport>> {
    roots(settings)
        .into_iter()
        .map(
            |Root {
                 upstream,
                 path: root,
                 lock,
                 ..
             }| {
                let mut out = Outcome::new(upstream, &root);
                if !root.is_dir() {
                    out.note = Some("nothing cached yet".into());
                    return out;
                }
                out.in_use = lock.is_none();
                let repair = !dry_run && !out.in_use;
                let store = if repair {
                    match FsStore::open(&root) {
                        Ok(s) => s,
                        Err(e) => {
                            out.note = Some(e.to_string());
                            return out;
                        }
                    }
                } else {
                    FsStore::view(&root)
                };
                if out.in_use && !dry_run {
                    out.note = Some(
                        "in use by a running regcache: checked, nothing removed (the worker \
                     removes a corrupt entry itself when it reads one)"
                            .into(),
                    );
                }
                out.result = Some(store.fsck(repair));
                drop(lock);
                out
            },
        )
        .collect()
}

/// Outcomes for scripts (`--json`).
pub fn json<T: Serialize>(outcomes: &[Outcome<T>]) -> String {
    serde_json::to_string_pretty(outcomes).expect("serialisable")
}

/// `gc`'s outcome for people.
pub fn gc_text(outcomes: &[Outcome<Report>], dry_run: bool) -> String {
    let mut s = String::new();
    let verb = if dry_run { "would remove" } else { "removed" };
    for o in outcomes {
        s.push_str(&format!(
            "{} ({}): {}\n",
            o.upstream,
            o.storage.display(),
            o.policy
        ));
        if let Some(note) = &o.note {
            s.push_str(&format!("  {note}\n"));
        }
        if let Some(r) = &o.result {
            for item in &r.removed {
                let tags = if item.tags.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", item.tags.join(", "))
                };
                s.push_str(&format!(
                    "  {verb} {}{tags}: {} ({})\n",
                    item.what,
                    policy::size(item.bytes),
                    item.reason.as_str()
                ));
            }
            s.push_str(&format!(
                "  {verb} {} item(s), {}; {} stored {}\n",
                r.removed.len(),
                policy::size(r.freed_bytes),
                policy::size(r.stored_bytes),
                if dry_run { "would stay" } else { "stay" }
            ));
        }
    }
    s
}

/// `fsck`'s outcome for people.
pub fn fsck_text(outcomes: &[Outcome<FsckReport>]) -> String {
    let mut s = String::new();
    for o in outcomes {
        s.push_str(&format!("{} ({})\n", o.upstream, o.storage.display()));
        if let Some(note) = &o.note {
            s.push_str(&format!("  {note}\n"));
        }
        if let Some(r) = &o.result {
            s.push_str(&format!(
                "  checked {} blob(s), {} manifest(s), {} tag(s), {}\n",
                r.blobs,
                r.manifests,
                r.tags,
                policy::size(r.bytes_checked)
            ));
            let removed = if r.repaired { " (removed)" } else { "" };
            for c in &r.corrupt {
                s.push_str(&format!("  corrupt{removed}: {c}\n"));
            }
            for d in &r.dangling {
                s.push_str(&format!("  dangling{removed}: {d}\n"));
            }
            for i in &r.incomplete {
                s.push_str(&format!("  incomplete (not an error): {i}\n"));
            }
            if r.clean() {
                s.push_str("  ok\n");
            }
        }
    }
    s
}
