//! Preloading: images fetched into the cache before anyone pulls them, from
//! `REGCACHE_PRELOAD_FILE` at start and every `REGCACHE_PRELOAD_EVERY`, or
//! on demand (`POST /api/v1/preload?image=...`, admin token required).
//!
//! A list is one image a line, as clients name them through regcache
//! (`alpine:3.20`, `ghcr.io/org/app:1.0`, `quay.io/x/y@sha256:...`),
//! optionally followed by the platforms of an index to take
//! (`linux/amd64,linux/arm64`; none: all). `#` starts a comment.
//!
//! Each image is pulled through the front's own routes and workers, as a
//! client would pull it: manifest, the index's platforms, then every blob
//! not yet stored. A failure is reported (status page, metrics, log) and
//! tried again only at the next scheduled run, never in a loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue};
use http_body_util::BodyExt;
use regcache_protocol::request::{Endpoint, Method, RepoRequest};
use regcache_protocol::{Digest, Manifest, Reference};
use serde::Serialize;

use crate::routing::Route;
use crate::server::Front;

/// Every manifest type a preload accepts.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// One line of a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub image: String,
    /// `os/arch[/variant]`; empty: every platform.
    pub platforms: Vec<String>,
}

/// Parses a list; the error names the line.
pub fn parse_list(text: &str) -> Result<Vec<Item>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let image = parts.next().expect("non-empty").to_owned();
        let platforms: Vec<String> = parts
            .flat_map(|p| p.split(','))
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(bad) = platforms
            .iter()
            .find(|p| !(1..=2).contains(&p.matches('/').count()))
        {
            return Err(format!(
                "line {}: {bad:?} is not a platform like linux/amd64",
                n + 1
            ));
        }
        out.push(Item { image, platforms });
    }
    Ok(out)
}

/// What preloading has done, for the status page.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Report {
    /// A list is configured (`REGCACHE_PRELOAD_FILE`).
    pub configured: bool,
    pub running: bool,
    pub runs: u64,
    pub last_run_ms: u64,
    pub images: Vec<ImageState>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ImageState {
    pub image: String,
    /// `done` or `failed`.
    pub state: String,
    pub detail: Option<String>,
}

/// Preloading's state, shared by its runs.
#[derive(Default)]
pub struct Preloads {
    running: AtomicBool,
    report: Mutex<Report>,
}

impl Preloads {
    pub fn new(configured: bool) -> Preloads {
        Preloads {
            running: AtomicBool::new(false),
            report: Mutex::new(Report {
                configured,
                ..Report::default()
            }),
        }
    }

    pub fn report(&self) -> Report {
        let mut r = self.report.lock().unwrap().clone();
        r.running = self.running.load(Ordering::Relaxed);
        r
    }

    /// Preloads `items` through `front`; the states of this run.
    pub async fn run(&self, front: &Front, items: &[Item]) -> Vec<ImageState> {
        self.running.store(true, Ordering::Relaxed);
        let mut states = Vec::new();
        for item in items {
            let state = match preload(front, item).await {
                Ok(done) => {
                    front
                        .metrics
                        .preload_images
                        .with_label_values(&["ok"])
                        .inc();
                    tracing::info!(image = %item.image, "{done}");
                    ImageState {
                        image: item.image.clone(),
                        state: "done".into(),
                        detail: Some(done),
                    }
                }
                Err(e) => {
                    front
                        .metrics
                        .preload_images
                        .with_label_values(&["failed"])
                        .inc();
                    tracing::warn!(image = %item.image, error = %e, "preload failed; tried again at the next run");
                    ImageState {
                        image: item.image.clone(),
                        state: "failed".into(),
                        detail: Some(e),
                    }
                }
            };
            states.push(state);
        }
        let mut r = self.report.lock().unwrap();
        r.runs += 1;
        r.last_run_ms = crate::status::millis(SystemTime::now());
        // The latest word on each image, newest first.
        for s in states.iter().rev() {
            r.images.retain(|i| i.image != s.image);
            r.images.insert(0, s.clone());
        }
        r.images.truncate(200);
        drop(r);
        self.running.store(false, Ordering::Relaxed);
        states
    }
}

/// A list to preload, and how often.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub path: String,
    pub items: Vec<Item>,
    pub every: std::time::Duration,
}

/// Runs `schedule` now (the workers being ready) and then every period.
pub async fn schedule(front: std::sync::Arc<Front>, schedule: Schedule) {
    loop {
        tracing::info!(list = %schedule.path, images = schedule.items.len(), "preloading");
        let states = front.preloads.run(&front, &schedule.items).await;
        let failed = states.iter().filter(|s| s.state == "failed").count();
        tracing::info!(list = %schedule.path, failed, "preload run done; next in {}", humantime::format_duration(schedule.every));
        tokio::time::sleep(schedule.every).await;
    }
}

/// `image` as a manifest request path (`/v2/<name>/manifests/<ref>`).
fn manifest_path(image: &str) -> Result<String, String> {
    let (name, reference) = match image.split_once('@') {
        Some((n, d)) => (n, d.to_owned()),
        None => {
            let slash = image.rfind('/').map_or(0, |i| i + 1);
            match image[slash..].rfind(':') {
                Some(c) => (&image[..slash + c], image[slash + c + 1..].to_owned()),
                None => (image, "latest".to_owned()),
            }
        }
    };
    if name.is_empty() {
        return Err(format!("{image:?} names no image"));
    }
    Ok(format!("/v2/{name}/manifests/{reference}"))
}

/// Pulls one image through the front; what it fetched, for the log.
async fn preload(front: &Front, item: &Item) -> Result<String, String> {
    let path = manifest_path(&item.image)?;
    let route = front
        .routes
        .route(Method::Get, None, &path, None)
        .map_err(|e| e.to_string())?;
    let Route::Upstream { index, request, .. } = route else {
        return Err(format!(
            "{:?} is not an image this cache serves",
            item.image
        ));
    };
    let top = fetch_manifest(front, index, &request).await?;
    let mut images = Vec::new();
    match platforms_of(&top) {
        Some(children) => {
            let wanted: Vec<Digest> = children
                .into_iter()
                .filter(|(_, p)| {
                    item.platforms.is_empty()
                        || item.platforms.iter().any(|w| p.starts_with(w.as_str()))
                })
                .map(|(d, _)| d)
                .collect();
            if wanted.is_empty() {
                return Err(format!(
                    "no platform of the index matches {}",
                    item.platforms.join(",")
                ));
            }
            for d in wanted {
                let r = RepoRequest {
                    endpoint: Endpoint::Manifest(Reference::Digest(d)),
                    ..request.clone()
                };
                images.push(fetch_manifest(front, index, &r).await?);
            }
        }
        None => images.push(top),
    }
    let (mut fetched, mut present, mut bytes) = (0, 0, 0u64);
    for m in &images {
        let refs = regcache_protocol::manifest::references(m).map_err(|e| e.to_string())?;
        for d in refs.blobs {
            let blob = |method| RepoRequest {
                method,
                endpoint: Endpoint::Blob(d.clone()),
                ..request.clone()
            };
            // A HEAD first: what is stored is not read again.
            let head = forward(front, index, &blob(Method::Head), HeaderMap::new()).await?;
            if head.headers().get("x-cache").is_some_and(|v| v == "HIT") {
                present += 1;
                continue;
            }
            let resp = forward(front, index, &blob(Method::Get), HeaderMap::new()).await?;
            let mut body = resp.into_body();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| format!("blob {d}: {e}"))?;
                if let Some(data) = frame.data_ref() {
                    bytes += data.len() as u64;
                }
            }
            fetched += 1;
        }
    }
    front.metrics.preload_bytes.inc_by(bytes);
    Ok(format!(
        "preloaded: {} manifest(s), {fetched} blob(s) fetched ({} bytes), {present} already cached",
        images.len(),
        bytes
    ))
}

async fn forward(
    front: &Front,
    index: usize,
    request: &RepoRequest,
    headers: HeaderMap,
) -> Result<http::Response<regcache_protocol::body::Body>, String> {
    if !front.workers[index].is_ready() {
        return Err(format!(
            "the worker of {} is not ready",
            front.workers[index].upstream.name()
        ));
    }
    let resp = front
        .proxy
        .forward(
            index,
            request,
            &headers,
            crate::proxy::Sender::Preload,
            false,
        )
        .await
        .map_err(|e| format!("worker unreachable: {e}"))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(format!(
            "{} {status}: {}",
            request.path_and_query(),
            String::from_utf8_lossy(&body).trim()
        ));
    }
    Ok(resp)
}

async fn fetch_manifest(
    front: &Front,
    index: usize,
    request: &RepoRequest,
) -> Result<Manifest, String> {
    let mut headers = HeaderMap::new();
    headers.insert(header::ACCEPT, HeaderValue::from_static(ACCEPT));
    let resp = forward(front, index, request, headers).await?;
    let media_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let bytes: Bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let digest = Digest::of(regcache_protocol::Algorithm::Sha256, &bytes);
    Ok(Manifest {
        media_type,
        bytes,
        digest,
    })
}

/// An index's children with their `os/arch[/variant]`; `None` for an image
/// manifest.
fn platforms_of(m: &Manifest) -> Option<Vec<(Digest, String)>> {
    #[derive(serde::Deserialize)]
    struct Index {
        manifests: Vec<Child>,
    }
    #[derive(serde::Deserialize)]
    struct Child {
        digest: String,
        #[serde(default)]
        platform: Option<Platform>,
    }
    #[derive(serde::Deserialize)]
    struct Platform {
        os: String,
        architecture: String,
        #[serde(default)]
        variant: Option<String>,
    }
    let index: Index = serde_json::from_slice(&m.bytes).ok()?;
    Some(
        index
            .manifests
            .into_iter()
            .filter_map(|c| {
                let d = c.digest.parse().ok()?;
                let p = c.platform.map_or_else(String::new, |p| match p.variant {
                    Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                    None => format!("{}/{}", p.os, p.architecture),
                });
                Some((d, p))
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_image_names_parse() {
        let items = parse_list("# warm before the rollout\nalpine:3.20\nghcr.io/org/app:1.0 linux/amd64,linux/arm64/v8\n\n").unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].platforms, ["linux/amd64", "linux/arm64/v8"]);
        assert!(parse_list("alpine amd64").unwrap_err().contains("line 1"));
        assert_eq!(
            manifest_path("alpine:3.20").unwrap(),
            "/v2/alpine/manifests/3.20"
        );
        assert_eq!(
            manifest_path("localhost:5000/x/y").unwrap(),
            "/v2/localhost:5000/x/y/manifests/latest"
        );
        assert_eq!(
            manifest_path("ghcr.io/o/a@sha256:abc").unwrap(),
            "/v2/ghcr.io/o/a/manifests/sha256:abc"
        );
    }
}
