//! The worker's internal endpoints, which only the front asks (their paths
//! are outside `/v2/`, so no client request is ever routed to them).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The worker's Prometheus page.
pub const METRICS_PATH: &str = "/metrics";
/// The worker's [`Inventory`] as JSON.
pub const INVENTORY_PATH: &str = "/_regcache/inventory";

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
    /// Manifests fetched for this repository (by tag or by digest).
    #[serde(default)]
    pub manifests: Vec<String>,
}
