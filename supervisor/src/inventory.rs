//! What is cached, across all upstreams: `/api/v1/cache`,
//! `/api/v1/cache/summary` and `/v2/_catalog`, built from every worker's
//! inventory. Repositories are listed as clients address them through
//! regcache (`ghcr.io/org/img`, `library/debian`).

use std::collections::BTreeMap;

use regcache_protocol::internal::Inventory;
use serde::Serialize;

use crate::config::Upstream;

#[derive(Debug, Serialize)]
pub struct Repository {
    /// The name upstream.
    pub name: String,
    /// The name to pull through regcache.
    pub pull: String,
    pub tags: BTreeMap<String, String>,
    pub manifests: Vec<String>,
    /// What its images hold (shared blobs count in each repository).
    pub bytes: u64,
    /// When one of its images was last pulled (ms since the epoch; 0: not known).
    pub last_used_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct UpstreamCache {
    pub upstream: String,
    pub url: String,
    /// False when the worker could not be asked (restarting).
    pub available: bool,
    pub repositories: Vec<Repository>,
    pub blobs: u64,
    pub bytes: u64,
}

/// The path prefix clients use for `up`, if any (none for Docker Hub).
pub fn pull_prefix(up: &Upstream) -> Option<String> {
    if up.is_docker_hub() {
        return None;
    }
    if up.authority.port().is_none() {
        return Some(up.authority.host().to_owned());
    }
    // host:port cannot be a path component: use an alias that can.
    up.aliases
        .iter()
        .find(|a| !a.contains(':'))
        .cloned()
        .or_else(|| Some(up.name()))
}

pub fn build(up: &Upstream, inv: Option<Inventory>) -> UpstreamCache {
    let available = inv.is_some();
    let inv = inv.unwrap_or_default();
    let prefix = pull_prefix(up);
    let repositories = inv
        .repositories
        .into_iter()
        .map(|(name, r)| Repository {
            pull: match &prefix {
                Some(p) => format!("{p}/{name}"),
                None => name.clone(),
            },
            name,
            tags: r.tags,
            manifests: r.manifests,
            bytes: r.bytes,
            last_used_ms: r.last_used_ms,
        })
        .collect();
    UpstreamCache {
        upstream: up.name(),
        url: up.url(),
        available,
        repositories,
        blobs: inv.blobs,
        bytes: inv.bytes,
    }
}

/// Counts per upstream and in total.
pub fn summary(caches: &[UpstreamCache]) -> serde_json::Value {
    let mut total = serde_json::json!({"repositories": 0, "tags": 0, "blobs": 0, "bytes": 0});
    let per: Vec<serde_json::Value> = caches
        .iter()
        .map(|c| {
            let tags: usize = c.repositories.iter().map(|r| r.tags.len()).sum();
            for (k, v) in [
                ("repositories", c.repositories.len() as u64),
                ("tags", tags as u64),
                ("blobs", c.blobs),
                ("bytes", c.bytes),
            ] {
                total[k] = (total[k].as_u64().unwrap_or(0) + v).into();
            }
            serde_json::json!({
                "upstream": c.upstream, "url": c.url, "available": c.available,
                "repositories": c.repositories.len(), "tags": tags,
                "blobs": c.blobs, "bytes": c.bytes,
            })
        })
        .collect();
    serde_json::json!({"upstreams": per, "total": total})
}

/// One page of the catalog: up to `n` names after `last`, and whether more follow.
pub fn catalog_page(caches: &[UpstreamCache], n: usize, last: Option<&str>) -> (Vec<String>, bool) {
    let mut all: Vec<&str> = caches
        .iter()
        .flat_map(|c| c.repositories.iter().map(|r| r.pull.as_str()))
        .collect();
    all.sort_unstable();
    all.dedup();
    let start = match last {
        Some(l) => all.partition_point(|r| *r <= l),
        None => 0,
    };
    let page: Vec<String> = all[start..].iter().take(n).map(|s| s.to_string()).collect();
    let more = start + page.len() < all.len();
    (page, more)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    #[test]
    fn names_as_clients_pull_them_and_pages() {
        let ups = config::parse(
            r#"["docker.io", "ghcr.io", {"registry": "http://h:1", "aliases": ["in.house"]}]"#,
        )
        .unwrap();
        let inv = |names: &[&str]| Inventory {
            repositories: names
                .iter()
                .map(|n| (n.to_string(), Default::default()))
                .collect(),
            blobs: 2,
            bytes: 10,
        };
        let caches = vec![
            build(&ups[0], Some(inv(&["library/debian"]))),
            build(&ups[1], Some(inv(&["org/img"]))),
            build(&ups[2], Some(inv(&["team/app"]))),
        ];
        let (all, more) = catalog_page(&caches, 100, None);
        assert_eq!(
            all,
            ["ghcr.io/org/img", "in.house/team/app", "library/debian"]
        );
        assert!(!more);
        let (p1, more) = catalog_page(&caches, 2, None);
        assert_eq!(p1.len(), 2);
        assert!(more);
        let (p2, more) = catalog_page(&caches, 2, Some(&p1[1]));
        assert_eq!(p2, ["library/debian"]);
        assert!(!more);
        let s = summary(&caches);
        assert_eq!(s["total"]["blobs"], 6);
        assert_eq!(s["total"]["repositories"], 3);
    }
}
