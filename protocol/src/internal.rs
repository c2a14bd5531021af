//! The worker's internal endpoints, which only the front asks (their paths
//! are outside `/v2/`, so no client request is ever routed to them).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The worker's Prometheus page.
pub const METRICS_PATH: &str = "/metrics";
/// The worker's [`Inventory`] as JSON.
pub const INVENTORY_PATH: &str = "/_regcache/inventory";
/// The worker's [`Status`] as JSON.
pub const STATUS_PATH: &str = "/_regcache/status";
/// Set by the front on requests that came from another replica of the
/// cluster (over the authenticated peer listener): the worker answers as the
/// owner and never asks a peer in turn. Removed from every client request.
pub const FROM_PEER: &str = "x-regcache-peer";
/// Set by the front on its own preload requests: the worker fetches nothing
/// ahead of them (a preload asks for exactly what it wants, platforms
/// included). Removed from every client request.
pub const PRELOAD: &str = "x-regcache-preload";
/// On a tag's manifest answered to a peer: when upstream last confirmed
/// the tag (ms since the epoch).
pub const CONFIRMED: &str = "x-regcache-confirmed";

/// How one worker is doing.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// What and where its store is (no secrets).
    pub store: String,
    /// Why the store serves with less than it should (a shared tier away).
    #[serde(default)]
    pub degraded: Option<String>,
    #[serde(default)]
    pub remote_errors: u64,
    /// Writes waiting for the shared tier.
    #[serde(default)]
    pub backfill: u64,
    /// Is the upstream taken to be away (breaker open, rate-limited, offline)?
    #[serde(default)]
    pub upstream_away: bool,
    #[serde(default)]
    pub fills_in_flight: u64,
    /// Live replicas of its cluster, itself included (0: no cluster).
    #[serde(default)]
    pub members: u64,
    /// Never asks its upstream (`REGCACHE_OFFLINE`).
    #[serde(default)]
    pub offline: bool,
    /// What its own answers have been since it started (the front adds the
    /// hits it answered itself).
    #[serde(default)]
    pub totals: Totals,
    /// Bytes stored locally, and the budget (0: none).
    #[serde(default)]
    pub stored_bytes: u64,
    #[serde(default)]
    pub budget_bytes: u64,
    /// Blob downloads in progress.
    #[serde(default)]
    pub fills: Vec<FillProgress>,
}

/// Counts of answers, for hit ratios and bytes saved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Blob and manifest answers from the cache (hit, stale).
    pub hits: u64,
    /// ... that needed upstream (miss, revalidated, bypass).
    pub misses: u64,
    /// Bytes sent to clients from the cache, and fetched for them upstream.
    pub cache_bytes: u64,
    pub upstream_bytes: u64,
}

impl Totals {
    pub fn add(&mut self, o: &Totals) {
        self.hits += o.hits;
        self.misses += o.misses;
        self.cache_bytes += o.cache_bytes;
        self.upstream_bytes += o.upstream_bytes;
    }
}

/// One blob download in progress.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FillProgress {
    pub repository: String,
    pub digest: String,
    pub written: u64,
    /// `None`: upstream sent no length.
    pub total: Option<u64>,
}

/// What one worker's cache holds.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// Repository name (upstream's) -> what is known of it.
    #[serde(default)]
    pub repositories: BTreeMap<String, Repository>,
    #[serde(default)]
    pub blobs: u64,
    #[serde(default)]
    pub bytes: u64,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repository {
    /// Tag -> digest.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Manifests fetched for this repository (by tag or by digest) and
    /// still stored.
    #[serde(default)]
    pub manifests: Vec<String>,
    /// Bytes its stored manifests hold with what they refer to (a blob
    /// shared with another repository counts in both).
    #[serde(default)]
    pub bytes: u64,
    /// When one of its images was last pulled (ms since the epoch; 0: not
    /// known yet).
    #[serde(default)]
    pub last_used_ms: u64,
}
