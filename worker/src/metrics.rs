//! The worker's Prometheus metrics, labelled with its upstream.
//!
//! Handlers call the named recorders here instead of touching counters.
//! Labels are bounded: type, result, source, status class; never a
//! repository, tag or digest. The supervisor scrapes `/metrics` from every
//! worker and merges the families into its own exposition.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use regcache_protocol::request::Kind;
use regcache_protocol::response::Outcome;

pub struct Metrics {
    registry: Registry,
    /// The series of a hit (manifest, blob) and of bytes from the cache,
    /// resolved once: hits are the hot path, and each `with_label_values`
    /// hashes its labels under a lock.
    hits: [Hit; 2],
    cache_bytes: IntCounter,
    requests: IntCounterVec,
    duration: HistogramVec,
    served_bytes: IntCounterVec,
    upstream_requests: IntCounterVec,
    pub fills_in_flight: IntGauge,
    tokens: IntCounterVec,
    pub ratelimit_remaining: IntGauge,
    pub stored_bytes: IntGauge,
    pub stored_blobs: IntGauge,
    proxy_hits: IntCounterVec,
    proxy_misses: IntCounterVec,
    pub stale_served: IntCounter,
    pub fill_failures: IntCounter,
    pub fill_resumes: IntCounter,
    pub fills_followed: IntCounter,
    pub fills_from_store: IntCounter,
    pub read_ahead: IntCounter,
    pub store_degraded: IntGauge,
    pub store_backfill: IntGauge,
    pub store_remote_errors: IntGauge,
    pub upstream_refused: IntCounter,
    pub upstream_away: IntGauge,
    fill_duration: Histogram,
    pub bypassed: IntCounter,
    budget: IntGauge,
    evictions: IntCounterVec,
    evicted_bytes: IntCounterVec,
    disk_full: IntCounter,
    index_ready: IntGauge,
    pub peer_fetches: IntCounter,
    pub peer_fallbacks: IntCounter,
    pub peer_served: IntCounter,
    pub cluster_members: IntGauge,
}

struct Hit {
    requests: IntCounter,
    duration: Histogram,
    proxy_hits: IntCounter,
}

impl Metrics {
    /// All of a worker's metrics, its process metrics included.
    pub fn new(upstream: &str) -> Metrics {
        Self::build(upstream, true)
    }

    /// The request series only, for hits the supervisor answers for this
    /// upstream: the supervisor's page sums them with the worker's.
    pub fn for_front(upstream: &str) -> Metrics {
        Self::build(upstream, false)
    }

    fn build(upstream: &str, worker: bool) -> Metrics {
        let labels = [("upstream".to_string(), upstream.to_string())].into();
        let registry = Registry::new_custom(None, Some(labels)).expect("valid labels");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let single = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        // Buckets from a page-cache manifest hit (~100 us) to a slow cold blob.
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "regcache_request_duration_seconds",
                "Time to response headers, by request type.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["type"],
        )
        .expect("valid metric");
        let requests = counter(
            "regcache_requests_total",
            "Registry requests answered, by what was asked and how it was answered.",
            &["type", "result"],
        );
        let served_bytes = counter(
            "regcache_served_bytes_total",
            "Blob and manifest bytes sent to clients, by where they came from.",
            &["source"],
        );
        let proxy_hits = counter(
            "registry_proxy_hits_total",
            "registry:2 compatible: requests answered from cache.",
            &["type"],
        );
        let hit = |kind: Kind| Hit {
            requests: requests.with_label_values(&[kind.as_str(), Outcome::Hit.label()]),
            duration: duration.with_label_values(&[kind.as_str()]),
            proxy_hits: proxy_hits.with_label_values(&[kind.as_str()]),
        };
        let m = Metrics {
            hits: [hit(Kind::Manifest), hit(Kind::Blob)],
            cache_bytes: served_bytes.with_label_values(&["cache"]),
            requests,
            duration,
            served_bytes,
            proxy_hits,
            proxy_misses: counter(
                "registry_proxy_misses_total",
                "registry:2 compatible: requests that went upstream.",
                &["type"],
            ),
            upstream_requests: counter(
                "regcache_upstream_requests_total",
                "Requests sent upstream (token servers and redirect hops included), by status class.",
                &["status"],
            ),
            fills_in_flight: gauge(
                "regcache_fills_in_flight",
                "Blob fetches from upstream in progress.",
            ),
            tokens: counter(
                "regcache_token_requests_total",
                "Token requests to upstream token servers, by result.",
                &["result"],
            ),
            ratelimit_remaining: gauge(
                "regcache_upstream_ratelimit_remaining",
                "Last ratelimit-remaining seen from upstream (Docker Hub pulls left), -1 if never seen.",
            ),
            stored_bytes: gauge(
                "regcache_cache_size_bytes",
                "Bytes of blobs and manifests in the cache.",
            ),
            stored_blobs: gauge("regcache_cache_blobs", "Number of blobs in the cache."),
            stale_served: single(
                "regcache_stale_served_total",
                "Tags answered from cache because upstream could not be asked.",
            ),
            fill_failures: single(
                "regcache_fill_failures_total",
                "Blob fills that failed and committed nothing.",
            ),
            fill_resumes: single(
                "regcache_fill_resumes_total",
                "Upstream blob transfers that broke off and were resumed with Range.",
            ),
            fills_followed: single(
                "regcache_fill_answers_followed_total",
                "Answers of a blob in flight that the front read from the fill's spool (not relayed).",
            ),
            store_degraded: gauge(
                "regcache_store_degraded",
                "1 while the shared store (S3) is away and the local tier serves alone.",
            ),
            store_backfill: gauge(
                "regcache_store_backfill_pending",
                "Writes waiting for the shared store (retried until they land).",
            ),
            store_remote_errors: gauge(
                "regcache_store_remote_errors",
                "Failed requests to the shared store since the worker started.",
            ),
            fills_from_store: single(
                "regcache_fills_from_store_total",
                "Blob fills of the local tier from the shared store (S3) instead of upstream.",
            ),
            read_ahead: single(
                "regcache_read_ahead_total",
                "Blobs and manifests fetched ahead of a client's request (REGCACHE_READ_AHEAD).",
            ),
            upstream_refused: single(
                "regcache_upstream_refused_total",
                "Requests not sent upstream because it is taken to be away (breaker, Retry-After, offline).",
            ),
            upstream_away: gauge(
                "regcache_upstream_away",
                "1 while the upstream is taken to be away (breaker open, rate-limited or offline mode).",
            ),
            bypassed: single(
                "regcache_bypassed_total",
                "Blob and manifest answers passed through from upstream and stored nowhere (no room, tag rules).",
            ),
            budget: gauge(
                "regcache_cache_budget_bytes",
                "REGCACHE_MAX_SIZE: most bytes the local cache keeps (0: no budget).",
            ),
            evictions: counter(
                "regcache_evictions_total",
                "Images (or loose blobs) removed by the cache policy, by reason (size, disk, ttl).",
                &["reason"],
            ),
            evicted_bytes: counter(
                "regcache_evicted_bytes_total",
                "Bytes freed by the cache policy, by reason (size, disk, ttl).",
                &["reason"],
            ),
            disk_full: single(
                "regcache_disk_full_total",
                "Writes that found the cache's disk full (ENOSPC).",
            ),
            index_ready: gauge(
                "regcache_cache_index_ready",
                "1 once the index of the local cache is built (the budget is enforced from then on).",
            ),
            peer_fetches: single(
                "regcache_peer_fetches_total",
                "Blobs and manifests fetched from the replica that owns them instead of upstream.",
            ),
            peer_fallbacks: single(
                "regcache_peer_fallbacks_total",
                "Fetches the owner replica failed (unreachable, slow, refusing), then made upstream.",
            ),
            peer_served: single(
                "regcache_peer_served_total",
                "Requests answered for other replicas, as the owner of what they asked for.",
            ),
            cluster_members: gauge(
                "regcache_cluster_members",
                "Live replicas of the cluster seen, this one included (0: not in a cluster).",
            ),
            fill_duration: Histogram::with_opts(HistogramOpts::new(
                "regcache_fill_duration_seconds",
                "Time to fetch, verify and commit one blob from upstream.",
            ))
            .expect("valid metric"),
            registry,
        };
        let mut collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.requests.clone()),
            Box::new(m.duration.clone()),
            Box::new(m.served_bytes.clone()),
            Box::new(m.proxy_hits.clone()),
            Box::new(m.proxy_misses.clone()),
        ];
        // Everything else belongs to the worker process alone.
        if worker {
            collectors.extend([
                Box::new(m.upstream_requests.clone()) as Box<dyn prometheus::core::Collector>,
                Box::new(m.fills_in_flight.clone()),
                Box::new(m.tokens.clone()),
                Box::new(m.ratelimit_remaining.clone()),
                Box::new(m.stored_bytes.clone()),
                Box::new(m.stored_blobs.clone()),
                Box::new(m.stale_served.clone()),
                Box::new(m.fill_failures.clone()),
                Box::new(m.fill_resumes.clone()),
                Box::new(m.fills_from_store.clone()),
                Box::new(m.read_ahead.clone()),
                Box::new(m.store_degraded.clone()),
                Box::new(m.store_backfill.clone()),
                Box::new(m.store_remote_errors.clone()),
                Box::new(m.upstream_refused.clone()),
                Box::new(m.upstream_away.clone()),
                Box::new(m.fill_duration.clone()),
                Box::new(m.bypassed.clone()),
                Box::new(m.budget.clone()),
                Box::new(m.evictions.clone()),
                Box::new(m.evicted_bytes.clone()),
                Box::new(m.disk_full.clone()),
                Box::new(m.index_ready.clone()),
                Box::new(m.peer_fetches.clone()),
                Box::new(m.peer_fallbacks.clone()),
                Box::new(m.peer_served.clone()),
                Box::new(m.cluster_members.clone()),
            ]);
            #[cfg(target_os = "linux")]
            collectors.push(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ));
        } else {
            // Only the front reads a fill's spool.
            collectors.push(Box::new(m.fills_followed.clone()));
        }
        for c in collectors {
            m.registry.register(c).expect("unique metric");
        }
        m.ratelimit_remaining.set(-1);
        m
    }

    /// Brings the policy series up to what the store says it has done.
    pub fn policy(&self, s: &regcache_store::PolicyStats) {
        let catch_up = |c: &IntCounter, total: u64| {
            let now = c.get();
            if total > now {
                c.inc_by(total - now);
            }
        };
        for (reason, units, bytes) in &s.evicted {
            catch_up(
                &self.evictions.with_label_values(&[reason.as_str()]),
                *units,
            );
            catch_up(
                &self.evicted_bytes.with_label_values(&[reason.as_str()]),
                *bytes,
            );
        }
        catch_up(&self.disk_full, s.disk_full);
        self.budget.set(s.max_size.unwrap_or(0) as i64);
        self.index_ready.set(i64::from(s.ready));
    }

    /// Records one answered request.
    pub fn request(&self, kind: Kind, outcome: Option<Outcome>, error: bool, seconds: f64) {
        if let (false, Some(Outcome::Hit)) = (error, outcome) {
            let hit = match kind {
                Kind::Manifest => Some(&self.hits[0]),
                Kind::Blob => Some(&self.hits[1]),
                _ => None,
            };
            if let Some(h) = hit {
                h.requests.inc();
                h.duration.observe(seconds);
                h.proxy_hits.inc();
                return;
            }
        }
        let result = match (error, outcome) {
            (true, _) => "error",
            (false, Some(o)) => o.label(),
            (false, None) => "forwarded",
        };
        self.requests
            .with_label_values(&[kind.as_str(), result])
            .inc();
        self.duration
            .with_label_values(&[kind.as_str()])
            .observe(seconds);
        if matches!(kind, Kind::Manifest | Kind::Blob) && !error {
            let t = kind.as_str();
            match outcome {
                Some(Outcome::Hit) | Some(Outcome::Stale) => {
                    self.proxy_hits.with_label_values(&[t]).inc()
                }
                Some(_) => self.proxy_misses.with_label_values(&[t]).inc(),
                None => {}
            }
        }
    }

    /// What the answers recorded here add up to.
    pub fn totals(&self) -> regcache_protocol::internal::Totals {
        let get = |v: &IntCounterVec, labels: &[&str]| v.with_label_values(labels).get();
        let (mut hits, mut misses) = (0, 0);
        for t in ["manifest", "blob"] {
            hits += get(&self.proxy_hits, &[t]);
            misses += get(&self.proxy_misses, &[t]);
        }
        regcache_protocol::internal::Totals {
            hits,
            misses,
            cache_bytes: get(&self.served_bytes, &["cache"]),
            upstream_bytes: get(&self.served_bytes, &["upstream"]),
        }
    }

    /// Bytes sent to clients for an answer produced as `outcome`.
    pub fn served(&self, outcome: Outcome, bytes: u64) {
        if outcome.from_cache() {
            self.cache_bytes.inc_by(bytes);
        } else {
            self.served_bytes
                .with_label_values(&["upstream"])
                .inc_by(bytes);
        }
    }

    /// Records an upstream answer (`None`: no answer at all).
    pub fn upstream(&self, status: Option<u16>) {
        let class = match status {
            Some(s) if (200..300).contains(&s) => "2xx",
            Some(s) if (300..400).contains(&s) => "3xx",
            Some(s) if (400..500).contains(&s) => "4xx",
            Some(_) => "5xx",
            None => "error",
        };
        self.upstream_requests.with_label_values(&[class]).inc();
    }

    pub fn token(&self, ok: bool) {
        self.tokens
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    pub fn fill_seconds(&self, s: f64) {
        self.fill_duration.observe(s);
    }

    /// The text exposition of everything above.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

/// A registry's metrics as Prometheus text.
pub fn render(registry: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .expect("text encoding cannot fail");
    String::from_utf8(out).expect("exposition is UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_and_named_by_convention() {
        let m = Metrics::new("ghcr.io");
        m.request(Kind::Blob, Some(Outcome::Miss), false, 0.01);
        m.request(Kind::Blob, Some(Outcome::Hit), false, 0.001);
        m.served(Outcome::Hit, 10);
        let text = m.render();
        assert!(
            text.contains(
                r#"regcache_requests_total{result="hit",type="blob",upstream="ghcr.io"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"registry_proxy_misses_total{type="blob",upstream="ghcr.io"} 1"#));
        assert!(
            text.contains(r#"regcache_served_bytes_total{source="cache",upstream="ghcr.io"} 10"#)
        );
        assert!(text.contains("process_resident_memory_bytes{upstream=\"ghcr.io\"}"));
    }
}
