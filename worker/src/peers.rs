//! The other replicas of a cluster, and which one owns a digest or a tag.
//!
//! Members are found from `REGCACHE_PEERS` (`host:port` of each replica's
//! peer listener; a name such as Swarm's `tasks.regcache:5001` resolves to
//! every replica), re-resolved and probed every few seconds: a replica is a
//! member while its `/peer/v1/id` answers with the cluster's secret. The
//! owner of a key is chosen by rendezvous hashing over the live members
//! (this replica included): every replica that sees the same members picks
//! the same owner, and a member leaving moves only its own keys. Churn may
//! cost a duplicate upstream fetch, never a wrong byte: whatever a peer
//! sends is verified like an upstream's answer.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use crate::auth::Secret;
use crate::tls::Trust;

/// How often members are re-resolved and probed.
const REFRESH: Duration = Duration::from_secs(3);
/// A member that does not answer its probe within this is not one.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
pub use regcache_protocol::internal::CONFIRMED;

/// How this replica finds the others.
#[derive(Debug, Clone)]
pub struct PeerSettings {
    /// This replica's id (the supervisor's `REGCACHE_NODE_ID`).
    pub node_id: String,
    /// `host:port` entries, each resolving to one or more replicas.
    pub entries: Vec<String>,
    pub secret: Secret,
    /// This upstream's path segment on the peer endpoint.
    pub upstream_dir: String,
}

/// One live replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    /// `None` for this replica.
    pub addr: Option<SocketAddr>,
}

pub struct Peers {
    settings: PeerSettings,
    members: RwLock<Vec<Member>>,
    client: reqwest::Client,
}

impl Peers {
    pub fn new(settings: PeerSettings) -> Result<Arc<Peers>, reqwest::Error> {
        // Peers speak plain HTTP; the TLS settings only keep reqwest from
        // reading the system's CA bundle (see `tls`).
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(Trust::new(Vec::new()).config(&[]))
            .no_proxy()
            .connect_timeout(PROBE_TIMEOUT)
            .read_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let me = Member {
            id: settings.node_id.clone(),
            addr: None,
        };
        Ok(Arc::new(Peers {
            settings,
            members: RwLock::new(vec![me]),
            client,
        }))
    }

    /// Keeps the member list current, in the background.
    pub fn start(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                me.refresh().await;
                tokio::time::sleep(REFRESH).await;
            }
        });
    }

    /// Resolves every entry and keeps the replicas that answer as members.
    pub async fn refresh(&self) {
        let mut addrs = Vec::new();
        for entry in &self.settings.entries {
            match tokio::net::lookup_host(entry.as_str()).await {
                Ok(found) => addrs.extend(found),
                Err(e) => tracing::debug!(%entry, error = %e, "peer name does not resolve"),
            }
        }
        addrs.sort();
        addrs.dedup();
        let probes = addrs
            .into_iter()
            .map(|a| async move { (a, self.probe(a).await) });
        let mut members = vec![Member {
            id: self.settings.node_id.clone(),
            addr: None,
        }];
        for (addr, id) in futures_util::future::join_all(probes).await {
            match id {
                Some(id) if id == self.settings.node_id => {}
                Some(id) if !members.iter().any(|m| m.id == id) => members.push(Member {
                    id,
                    addr: Some(addr),
                }),
                Some(_) => {}
                None => tracing::debug!(%addr, "peer did not answer"),
            }
        }
        let mut current = self.members.write().unwrap();
        if current.len() != members.len() {
            tracing::info!(members = members.len(), "cluster membership changed");
        }
        *current = members;
    }

    /// The id a replica's peer endpoint says it has.
    async fn probe(&self, addr: SocketAddr) -> Option<String> {
        let resp = self
            .client
            .get(format!("http://{addr}/peer/v1/id"))
            .bearer_auth(self.settings.secret.expose())
            .timeout(PROBE_TIMEOUT)
            .send()
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        #[derive(serde::Deserialize)]
        struct Id {
            id: String,
        }
        let body = resp.bytes().await.ok()?;
        Some(serde_json::from_slice::<Id>(&body).ok()?.id)
    }

    /// Live members, this replica included.
    pub fn count(&self) -> usize {
        self.members.read().unwrap().len()
    }

    /// The member that owns `key`, unless it is this replica.
    pub fn owner(&self, key: &str) -> Option<Member> {
        let members = self.members.read().unwrap();
        let owner = members.iter().max_by_key(|m| weight(&m.id, key))?;
        owner.addr.is_some().then(|| owner.clone())
    }

    /// `GET` (or `HEAD`) of `path` (`/v2/...`) from `member`'s peer
    /// endpoint, answered as that replica's cache would answer it.
    pub async fn send(
        &self,
        member: &Member,
        method: reqwest::Method,
        path: &str,
        accept: Option<&str>,
        from: Option<u64>,
    ) -> Result<reqwest::Response, String> {
        let addr = member.addr.ok_or("this replica is not a peer of itself")?;
        let url = format!("http://{addr}/peer/v1/{}{path}", self.settings.upstream_dir);
        let mut req = self
            .client
            .request(method, url)
            .bearer_auth(self.settings.secret.expose());
        if let Some(a) = accept {
            req = req.header(reqwest::header::ACCEPT, a);
        }
        if let Some(from) = from {
            req = req.header(reqwest::header::RANGE, format!("bytes={from}-"));
        }
        // Waiting long for the owner is worse than asking upstream.
        let resp = tokio::time::timeout(Duration::from_secs(5), req.send())
            .await
            .map_err(|_| "the owner did not answer within 5 s".to_string())?
            .map_err(|e| e.without_url().to_string())?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(format!("the owner answered {}", resp.status()))
        }
    }
}

/// Rendezvous weight of `member` for `key`: the first 8 bytes of a SHA-256
/// (stable across builds and machines, unlike `std`'s hasher).
fn weight(member: &str, key: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(member.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner_of(ids: &[&str], key: &str) -> String {
        ids.iter()
            .max_by_key(|id| weight(id, key))
            .unwrap()
            .to_string()
    }

    #[test]
    fn owners_spread_and_a_leaving_member_moves_only_its_own_keys() {
        let all = ["a", "b", "c"];
        let keys: Vec<String> = (0..3000).map(|i| format!("sha256:{i}")).collect();
        let before: Vec<String> = keys.iter().map(|k| owner_of(&all, k)).collect();
        for id in all {
            let n = before.iter().filter(|o| *o == id).count();
            assert!((800..1200).contains(&n), "{id} owns {n} of 3000");
        }
        let after: Vec<String> = keys.iter().map(|k| owner_of(&["a", "c"], k)).collect();
        for (b, a) in before.iter().zip(&after) {
            if b != "b" {
                assert_eq!(a, b, "a key not owned by the leaver moved");
            }
        }
    }
}
