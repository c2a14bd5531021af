//! The worker's settings, from its own environment (which the supervisor
//! built: the inherited environment plus this upstream's `variables`).

use std::path::PathBuf;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::auth::{Credentials, Secret};
use crate::priority::Nice;
use crate::tag_rules::TagRules;

/// Everything a worker needs to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The registry API base, `https://host[:port]`.
    pub upstream: reqwest::Url,
    /// This upstream's cache root.
    pub storage: PathBuf,
    pub credentials: Option<Credentials>,
    /// How long shutdown waits for requests and fills in flight.
    pub drain_timeout: Duration,
    pub upstream_options: UpstreamOptions,
    /// Where the cache lives besides the local directory.
    pub store: StoreSettings,
    /// What the local tier keeps: `REGCACHE_MAX_SIZE`, `REGCACHE_MIN_FREE`,
    /// `REGISTRY_PROXY_TTL`.
    pub policy: regcache_store::policy::Policy,
    /// How long a tag -> digest answer is used before an upstream HEAD
    /// (`REGCACHE_TAG_RULES` over `REGCACHE_TAG_FRESHNESS`).
    pub tag_rules: TagRules,
    /// `REGCACHE_CACHE_MANIFESTS` (default true): false passes every
    /// manifest through, storing blobs only.
    pub cache_manifests: bool,
    /// `REGCACHE_RECORD_USE` (default true): record last use for LRU and
    /// expiry (false only to measure what the bookkeeping costs).
    pub record_use: bool,
    /// `REGCACHE_READ_AHEAD` (default 1MiB; 0: off): the largest blob of a
    /// cold image manifest fetched with it, before the client asks.
    pub read_ahead: u64,
    /// The other replicas of this cluster (`REGCACHE_PEERS`), if any.
    pub peers: Option<crate::peers::PeerSettings>,
    /// `REGCACHE_NICE` (default 10): the CPU priority the worker runs at.
    pub nice: Nice,
}

/// `REGCACHE_NICE`, 0 (as started) to 19.
pub fn nice_from(env: &impl Fn(&str) -> Option<String>) -> Result<Nice, Error> {
    match env("REGCACHE_NICE").filter(|v| !v.is_empty()) {
        None => Ok(Nice::DEFAULT),
        Some(text) => Nice::parse(&text).ok_or(Error::Nice(text)),
    }
}

/// `REGCACHE_PEERS` with `REGCACHE_PEER_SECRET` (or `_FILE`) and the node id
/// the supervisor gives every worker (`REGCACHE_NODE_ID`).
pub fn peers_from(
    env: &impl Fn(&str) -> Option<String>,
    upstream_dir: &str,
) -> Result<Option<crate::peers::PeerSettings>, Error> {
    let Some(list) = env("REGCACHE_PEERS").filter(|v| !v.trim().is_empty()) else {
        return Ok(None);
    };
    let entries: Vec<String> = list
        .split([',', ' ', '\n'])
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect();
    if let Some(bad) = entries.iter().find(|e| {
        e.rsplit_once(':')
            .is_none_or(|(_, p)| p.parse::<u16>().is_err())
    }) {
        return Err(Error::Policy {
            var: "REGCACHE_PEERS",
            why: format!("{bad:?} is not host:port (the peer listener of a replica)"),
        });
    }
    Ok(Some(crate::peers::PeerSettings {
        node_id: env("REGCACHE_NODE_ID").unwrap_or_else(|| "standalone".into()),
        entries,
        secret: peer_secret_from(env)?,
        upstream_dir: upstream_dir.to_owned(),
    }))
}

/// The secret replicas of a cluster show each other.
pub type PeerSecret = Secret;

/// `REGCACHE_PEER_SECRET`, or the file `REGCACHE_PEER_SECRET_FILE` names
/// (a Swarm secret); required: peer traffic is never unauthenticated.
pub fn peer_secret_from(env: &impl Fn(&str) -> Option<String>) -> Result<PeerSecret, Error> {
    let secret = match env("REGCACHE_PEER_SECRET").filter(|v| !v.is_empty()) {
        Some(s) => s,
        None => match env("REGCACHE_PEER_SECRET_FILE").filter(|v| !v.is_empty()) {
            Some(path) => std::fs::read_to_string(&path)
                .map(|s| s.trim_end_matches(['\r', '\n']).to_owned())
                .map_err(|source| Error::SecretFile {
                    var: "REGCACHE_PEER_SECRET_FILE",
                    path,
                    source,
                })?,
            None => String::new(),
        },
    };
    if secret.len() < 16 {
        return Err(Error::Policy {
            var: "REGCACHE_PEER_SECRET",
            why: "a cluster needs a shared secret of at least 16 characters (REGCACHE_PEER_SECRET or REGCACHE_PEER_SECRET_FILE): peer traffic is never unauthenticated".into(),
        });
    }
    Ok(Secret::new(secret))
}

/// The cache policy from `REGCACHE_MAX_SIZE`, `REGCACHE_MIN_FREE` and
/// `REGISTRY_PROXY_TTL` (`0` or unset: kept until the budget needs room).
pub fn policy_from(
    env: &impl Fn(&str) -> Option<String>,
) -> Result<regcache_store::policy::Policy, Error> {
    use regcache_store::policy::{parse_size, MinFree, Policy};
    let get = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let bad = |var: &'static str| move |why: String| Error::Policy { var, why };
    let max_size = get("REGCACHE_MAX_SIZE")
        .map(|v| parse_size(&v))
        .transpose()
        .map_err(bad("REGCACHE_MAX_SIZE"))?
        .filter(|m| *m > 0);
    let min_free = get("REGCACHE_MIN_FREE")
        .map(|v| v.parse::<MinFree>())
        .transpose()
        .map_err(bad("REGCACHE_MIN_FREE"))?;
    let ttl = duration_from(env, "REGISTRY_PROXY_TTL", Duration::ZERO)?;
    Ok(Policy {
        max_size,
        min_free,
        ttl: (!ttl.is_zero()).then_some(ttl),
    })
}

/// `REGCACHE_READ_AHEAD`: a size (`0` turns read-ahead off).
pub fn read_ahead_from(env: &impl Fn(&str) -> Option<String>) -> Result<u64, Error> {
    match env("REGCACHE_READ_AHEAD").filter(|v| !v.trim().is_empty()) {
        None => Ok(crate::cache::READ_AHEAD_DEFAULT),
        Some(v) => regcache_store::policy::parse_size(&v).map_err(|why| Error::Policy {
            var: "REGCACHE_READ_AHEAD",
            why,
        }),
    }
}

/// `REGCACHE_RECORD_USE`: true unless set to false.
pub fn record_use_from(env: &impl Fn(&str) -> Option<String>) -> bool {
    !matches!(
        env("REGCACHE_RECORD_USE")
            .map(|v| v.trim().to_ascii_lowercase())
            .as_deref(),
        Some("false" | "0" | "no")
    )
}

/// `REGCACHE_TAG_RULES` over `REGCACHE_TAG_FRESHNESS`.
pub fn tag_rules_from(env: &impl Fn(&str) -> Option<String>) -> Result<TagRules, Error> {
    let default = duration_from(env, "REGCACHE_TAG_FRESHNESS", DEFAULT_TAG_FRESHNESS)?;
    match env("REGCACHE_TAG_RULES").filter(|v| !v.trim().is_empty()) {
        None => Ok(TagRules::uniform(default)),
        Some(text) => TagRules::parse(&text, default).map_err(|why| Error::Policy {
            var: "REGCACHE_TAG_RULES",
            why,
        }),
    }
}

/// The store behind the local tier (`REGISTRY_STORAGE`).
#[derive(Debug, Clone)]
pub enum StoreSettings {
    /// `filesystem` (the default): the local directory alone.
    Filesystem,
    /// `s3`: the local directory in front of a bucket.
    S3(regcache_store::s3::S3Config),
}

impl StoreSettings {
    /// From registry:2's variables (the AWS ones as a fallback); `prefix_of`
    /// is this upstream's directory under the bucket's root directory.
    pub fn from_env(
        env: &impl Fn(&str) -> Option<String>,
        upstream_dir: &str,
    ) -> Result<StoreSettings, Error> {
        let get = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        match get("REGISTRY_STORAGE").as_deref().map(str::trim) {
            None | Some("filesystem") => return Ok(StoreSettings::Filesystem),
            Some("s3") | Some("s3aws") => {}
            Some(other) => return Err(Error::Driver(other.to_owned())),
        }
        let secret = |var: &'static str,
                      file: &'static str,
                      fallback: &'static str|
         -> Result<Option<String>, Error> {
            if let Some(v) = get(var) {
                return Ok(Some(v));
            }
            match get(file) {
                Some(path) => std::fs::read_to_string(&path)
                    .map(|s| Some(s.trim_end_matches(['\r', '\n']).to_owned()))
                    .map_err(|source| Error::SecretFile {
                        var: file,
                        path,
                        source,
                    }),
                None => Ok(get(fallback)),
            }
        };
        let bucket = get("REGISTRY_STORAGE_S3_BUCKET").ok_or(Error::S3(
            "REGISTRY_STORAGE_S3_BUCKET is required with REGISTRY_STORAGE=s3",
        ))?;
        let secure = !matches!(
            get("REGISTRY_STORAGE_S3_SECURE")
                .map(|v| v.to_ascii_lowercase())
                .as_deref(),
            Some("false" | "0" | "no")
        );
        let endpoint = get("REGISTRY_STORAGE_S3_REGIONENDPOINT")
            .or_else(|| get("AWS_ENDPOINT_URL_S3"))
            .or_else(|| get("AWS_ENDPOINT_URL"))
            .map(|e| {
                if e.contains("://") {
                    e
                } else if secure {
                    format!("https://{e}")
                } else {
                    format!("http://{e}")
                }
            });
        let path_style = match get("REGISTRY_STORAGE_S3_FORCEPATHSTYLE") {
            Some(_) => flag_from(env, "REGISTRY_STORAGE_S3_FORCEPATHSTYLE")?,
            // Custom endpoints (MinIO, RGW) want the bucket in the path.
            None => endpoint.is_some(),
        };
        let access_key = secret(
            "REGISTRY_STORAGE_S3_ACCESSKEY",
            "REGISTRY_STORAGE_S3_ACCESSKEY_FILE",
            "AWS_ACCESS_KEY_ID",
        )?;
        let secret_key = secret(
            "REGISTRY_STORAGE_S3_SECRETKEY",
            "REGISTRY_STORAGE_S3_SECRETKEY_FILE",
            "AWS_SECRET_ACCESS_KEY",
        )?;
        if access_key.is_some() != secret_key.is_some() {
            return Err(Error::S3(
                "the S3 access key and secret key must be set together",
            ));
        }
        let root = get("REGISTRY_STORAGE_S3_ROOTDIRECTORY").unwrap_or_default();
        let root = root.trim_matches('/');
        Ok(StoreSettings::S3(regcache_store::s3::S3Config {
            bucket,
            region: get("REGISTRY_STORAGE_S3_REGION")
                .or_else(|| get("AWS_REGION"))
                .or_else(|| get("AWS_DEFAULT_REGION"))
                .unwrap_or_else(|| "us-east-1".into()),
            endpoint,
            access_key,
            secret_key,
            prefix: if root.is_empty() {
                upstream_dir.to_owned()
            } else {
                format!("{root}/{upstream_dir}")
            },
            path_style,
            skip_verify: flag_from(env, "REGISTRY_STORAGE_S3_SKIPVERIFY")?,
            chunk_size: number_from(env, "REGISTRY_STORAGE_S3_CHUNKSIZE", 10usize << 20)?,
            timeout: duration_from(env, "REGCACHE_S3_TIMEOUT", Duration::from_secs(10))?,
        }))
    }

    /// What and where, for logs and `check-config` (no secrets).
    pub fn describe(&self, local: &std::path::Path) -> String {
        match self {
            StoreSettings::Filesystem => format!("filesystem {}", local.display()),
            StoreSettings::S3(c) => format!("{} (local tier {})", c.describe(), local.display()),
        }
    }
}

/// How the worker treats its upstream when it is slow, away or odd.
#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    /// `REGCACHE_UPSTREAM_CONNECT_TIMEOUT`: to establish a connection.
    pub connect_timeout: Duration,
    /// `REGCACHE_UPSTREAM_RESPONSE_TIMEOUT`: from sending to the response headers.
    pub response_timeout: Duration,
    /// `REGCACHE_UPSTREAM_IDLE_TIMEOUT`: between two reads of a body.
    pub idle_timeout: Duration,
    /// `REGCACHE_UPSTREAM_CONCURRENCY`: requests waiting for an answer at once.
    pub concurrency: usize,
    /// `REGCACHE_BREAKER_FAILURES`: failures in a row that take the upstream to be away (0: never).
    pub breaker_failures: u32,
    /// `REGCACHE_BREAKER_COOLDOWN`: how long it is then left alone.
    pub breaker_cooldown: Duration,
    /// `REGCACHE_OFFLINE`: never ask upstream; serve what is cached.
    pub offline: bool,
    /// `REGCACHE_UPSTREAM_CA_FILE`: PEM roots trusted besides the system's.
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// `REGCACHE_UPSTREAM_TLS_SKIP_VERIFY`: accept any certificate (logged loudly).
    pub skip_verify: bool,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        UpstreamOptions {
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            concurrency: 32,
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(15),
            offline: false,
            extra_roots: Vec::new(),
            skip_verify: false,
        }
    }
}

impl UpstreamOptions {
    pub fn from_env(env: &impl Fn(&str) -> Option<String>) -> Result<UpstreamOptions, Error> {
        let d = UpstreamOptions::default();
        let extra_roots = match env("REGCACHE_UPSTREAM_CA_FILE").filter(|p| !p.is_empty()) {
            None => Vec::new(),
            Some(path) => {
                let pem = std::fs::read(&path).map_err(|source| Error::SecretFile {
                    var: "REGCACHE_UPSTREAM_CA_FILE",
                    path: path.clone(),
                    source,
                })?;
                CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .ok()
                    .filter(|c| !c.is_empty())
                    .ok_or(Error::Certificates { path })?
            }
        };
        Ok(UpstreamOptions {
            connect_timeout: duration_from(
                env,
                "REGCACHE_UPSTREAM_CONNECT_TIMEOUT",
                d.connect_timeout,
            )?,
            response_timeout: duration_from(
                env,
                "REGCACHE_UPSTREAM_RESPONSE_TIMEOUT",
                d.response_timeout,
            )?,
            idle_timeout: duration_from(env, "REGCACHE_UPSTREAM_IDLE_TIMEOUT", d.idle_timeout)?,
            concurrency: number_from(env, "REGCACHE_UPSTREAM_CONCURRENCY", d.concurrency)?,
            breaker_failures: number_from(env, "REGCACHE_BREAKER_FAILURES", d.breaker_failures)?,
            breaker_cooldown: duration_from(env, "REGCACHE_BREAKER_COOLDOWN", d.breaker_cooldown)?,
            offline: flag_from(env, "REGCACHE_OFFLINE")?,
            extra_roots,
            skip_verify: flag_from(env, "REGCACHE_UPSTREAM_TLS_SKIP_VERIFY")?,
        })
    }
}

/// Default wait for in-flight work at shutdown.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30);
/// Default tag freshness (`REGCACHE_TAG_FRESHNESS`).
pub const DEFAULT_TAG_FRESHNESS: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{var}: cannot read {path}: {source}")]
    SecretFile {
        var: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{var} is set but {missing} is not")]
    HalfCredentials {
        var: &'static str,
        missing: &'static str,
    },
    #[error("invalid duration {value:?} in {var} (use e.g. 60s, 5m, 1h30m, 500ms)")]
    Duration { var: &'static str, value: String },
    #[error("invalid upstream URL {0:?}")]
    Upstream(String),
    #[error("invalid number {value:?} in {var}")]
    Number { var: &'static str, value: String },
    #[error("{var} must be true or false, not {value:?}")]
    Flag { var: &'static str, value: String },
    #[error("REGCACHE_UPSTREAM_CA_FILE {path} holds no PEM certificate")]
    Certificates { path: String },
    #[error("REGISTRY_STORAGE={0} is not supported: use filesystem or s3")]
    Driver(String),
    #[error("{0}")]
    S3(&'static str),
    #[error("{var}: {why}")]
    Policy { var: &'static str, why: String },
    #[error("REGCACHE_NICE {0:?} is not a nice value from 0 (as started) to 19")]
    Nice(String),
}

impl Settings {
    /// The settings for `upstream` caching in `storage`, the rest from `env`.
    pub fn from_env(
        upstream: &str,
        storage: PathBuf,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Settings, Error> {
        let upstream = upstream
            .parse()
            .map_err(|_| Error::Upstream(upstream.to_owned()))?;
        check_env(&env)?;
        let dir = regcache_protocol::Authority::of(&upstream).dir_name();
        Ok(Settings {
            store: StoreSettings::from_env(&env, &dir)?,
            upstream,
            storage,
            credentials: credentials_from(&env)?,
            drain_timeout: duration_from(&env, "REGISTRY_HTTP_DRAINTIMEOUT", DEFAULT_DRAIN)?,
            upstream_options: UpstreamOptions::from_env(&env)?,
            policy: policy_from(&env)?,
            tag_rules: tag_rules_from(&env)?,
            cache_manifests: !matches!(
                env("REGCACHE_CACHE_MANIFESTS")
                    .map(|v| v.trim().to_ascii_lowercase())
                    .as_deref(),
                Some("false" | "0" | "no")
            ),
            record_use: record_use_from(&env),
            read_ahead: read_ahead_from(&env)?,
            peers: peers_from(&env, &dir)?,
            nice: nice_from(&env)?,
        })
    }
}

/// What a worker would refuse at start, checked without starting one (the
/// supervisor runs this for every upstream before anything starts).
pub fn check_env(env: &impl Fn(&str) -> Option<String>) -> Result<(), Error> {
    credentials_from(env)?;
    duration_from(env, "REGCACHE_TAG_FRESHNESS", DEFAULT_TAG_FRESHNESS)?;
    duration_from(env, "REGISTRY_HTTP_DRAINTIMEOUT", DEFAULT_DRAIN)?;
    UpstreamOptions::from_env(env)?;
    policy_from(env)?;
    tag_rules_from(env)?;
    read_ahead_from(env)?;
    peers_from(env, "check")?;
    nice_from(env)?;
    for var in ["REGCACHE_CACHE_MANIFESTS", "REGCACHE_RECORD_USE"] {
        if env(var).is_some() {
            // Unset means true here, so only the spelling is checked.
            flag_from(env, var)?;
        }
    }
    StoreSettings::from_env(env, "check").map(|_| ())
}

/// Reads `REGISTRY_PROXY_USERNAME`/`_PASSWORD`, or their `_FILE` forms (Docker
/// and Swarm secrets), from `env`.
pub fn credentials_from(
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<Credentials>, Error> {
    let read = |var: &'static str, file_var: &'static str| -> Result<Option<String>, Error> {
        if let Some(v) = env(var).filter(|v| !v.is_empty()) {
            return Ok(Some(v));
        }
        match env(file_var).filter(|v| !v.is_empty()) {
            Some(path) => std::fs::read_to_string(&path)
                .map(|s| Some(s.trim_end_matches(['\r', '\n']).to_owned()))
                .map_err(|source| Error::SecretFile {
                    var: file_var,
                    path,
                    source,
                }),
            None => Ok(None),
        }
    };
    let user = read("REGISTRY_PROXY_USERNAME", "REGISTRY_PROXY_USERNAME_FILE")?;
    let pass = read("REGISTRY_PROXY_PASSWORD", "REGISTRY_PROXY_PASSWORD_FILE")?;
    match (user, pass) {
        (Some(username), Some(p)) => Ok(Some(Credentials {
            username,
            password: Secret::new(p),
        })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(Error::HalfCredentials {
            var: "REGISTRY_PROXY_USERNAME",
            missing: "REGISTRY_PROXY_PASSWORD",
        }),
        (None, Some(_)) => Err(Error::HalfCredentials {
            var: "REGISTRY_PROXY_PASSWORD",
            missing: "REGISTRY_PROXY_USERNAME",
        }),
    }
}

/// Parses a duration with `humantime` (`1h30m`, `500ms`, `2min`, `30 s`);
/// a bare number is seconds, as registry:2 and lhns configurations write it.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    match s.parse::<u64>() {
        Ok(secs) => Some(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(s).ok(),
    }
}

/// Parses the duration in `var` of `env`, or `default` when unset.
pub fn duration_from(
    env: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    default: Duration,
) -> Result<Duration, Error> {
    match env(var).filter(|v| !v.trim().is_empty()) {
        None => Ok(default),
        Some(v) => parse_duration(&v).ok_or(Error::Duration { var, value: v }),
    }
}

/// Parses the number in `var` of `env`, or `default` when unset.
pub fn number_from<T: std::str::FromStr>(
    env: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    default: T,
) -> Result<T, Error> {
    match env(var).filter(|v| !v.trim().is_empty()) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| Error::Number { var, value: v }),
    }
}

/// Parses the boolean in `var` of `env` (`true`/`false`, `1`/`0`, `yes`/`no`); unset is false.
pub fn flag_from(env: &impl Fn(&str) -> Option<String>, var: &'static str) -> Result<bool, Error> {
    match env(var).map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("false") | Some("0") | Some("no") => Ok(false),
        Some("true") | Some("1") | Some("yes") => Ok(true),
        Some(other) => Err(Error::Flag {
            var,
            value: other.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn durations() {
        for (s, secs) in [
            ("60", 60.0),
            ("60s", 60.0),
            ("5m", 300.0),
            ("1h30m", 5400.0),
            ("500ms", 0.5),
            ("2min", 120.0),
            ("30 s", 30.0),
        ] {
            assert_eq!(
                parse_duration(s),
                Some(Duration::from_secs_f64(secs)),
                "{s}"
            );
        }
        for bad in ["", "x", "5 parsecs", "m"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn credentials() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let env: HashMap<&str, String> = [
            ("REGISTRY_PROXY_USERNAME", "u".to_string()),
            ("REGISTRY_PROXY_PASSWORD_FILE", file.display().to_string()),
        ]
        .into();
        let c = credentials_from(&|k| env.get(k).cloned()).unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.expose()), ("u", "s3cret"));
        assert!(credentials_from(&|_| None).unwrap().is_none());
        let half: HashMap<&str, String> = [("REGISTRY_PROXY_USERNAME", "u".to_string())].into();
        assert!(credentials_from(&|k| half.get(k).cloned()).is_err());
    }

    #[test]
    fn settings_from_env() {
        let env: HashMap<&str, String> = [("REGCACHE_TAG_FRESHNESS", "5m".to_string())].into();
        let s =
            Settings::from_env("https://ghcr.io", "/c".into(), |k| env.get(k).cloned()).unwrap();
        let (name, tag) = ("a/b".parse().unwrap(), "1".parse().unwrap());
        assert_eq!(
            s.tag_rules.of(&name, &tag),
            crate::tag_rules::Freshness::For(Duration::from_secs(300))
        );
        assert!(s.policy.is_unlimited());
        assert!(s.cache_manifests && s.record_use);
        assert_eq!(s.read_ahead, 1 << 20);
        assert_eq!(s.drain_timeout, DEFAULT_DRAIN);
        for (v, want) in [("0", Some(0)), ("256KiB", Some(256 << 10)), ("lots", None)] {
            let env: HashMap<&str, String> = [("REGCACHE_READ_AHEAD", v.to_string())].into();
            let got = read_ahead_from(&|k| env.get(k).cloned());
            assert_eq!(got.ok(), want, "{v}");
            assert_eq!(check_env(&|k| env.get(k).cloned()).is_ok(), want.is_some());
        }
        let gcs: HashMap<&str, String> = [("REGISTRY_STORAGE", "gcs".to_string())].into();
        let e = Settings::from_env("https://ghcr.io", "/c".into(), |k| gcs.get(k).cloned());
        assert!(matches!(e, Err(Error::Driver(_))));
        assert!(Settings::from_env("not a url", "/c".into(), |_| None).is_err());
    }

    /// lhns's MinIO stack, word for word, and the AWS fallbacks.
    #[test]
    fn s3_settings_take_registry2_names() {
        let env: HashMap<&str, String> = [
            ("REGISTRY_STORAGE", "s3"),
            ("REGISTRY_STORAGE_REDIRECT_DISABLE", "true"),
            ("REGISTRY_STORAGE_S3_BUCKET", "docker-registry"),
            ("REGISTRY_STORAGE_S3_REGION", "minio"),
            ("REGISTRY_STORAGE_S3_REGIONENDPOINT", "http://s3:9000"),
            ("REGISTRY_STORAGE_S3_ACCESSKEY", "minio"),
            ("REGISTRY_STORAGE_S3_SECRETKEY", "minio123"),
            ("REGISTRY_STORAGE_S3_ROOTDIRECTORY", "/cache/"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect();
        let s =
            Settings::from_env("https://ghcr.io", "/c".into(), |k| env.get(k).cloned()).unwrap();
        let StoreSettings::S3(c) = &s.store else {
            panic!("not s3: {:?}", s.store)
        };
        assert_eq!(
            (c.bucket.as_str(), c.region.as_str()),
            ("docker-registry", "minio")
        );
        assert_eq!(c.endpoint.as_deref(), Some("http://s3:9000"));
        assert_eq!(c.prefix, "cache/ghcr.io");
        assert!(c.path_style);
        let shown = format!("{:?} {}", c, s.store.describe("/data".as_ref()));
        assert!(!shown.contains("minio123"), "{shown}");
        let aws: HashMap<&str, String> = [
            ("REGISTRY_STORAGE", "s3"),
            ("REGISTRY_STORAGE_S3_BUCKET", "b"),
            ("AWS_ACCESS_KEY_ID", "AK"),
            ("AWS_SECRET_ACCESS_KEY", "SK"),
            ("AWS_REGION", "eu-west-1"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect();
        let s = Settings::from_env("http://127.0.0.1:5000", "/c".into(), |k| {
            aws.get(k).cloned()
        })
        .unwrap();
        let StoreSettings::S3(c) = &s.store else {
            panic!()
        };
        assert_eq!(
            (c.region.as_str(), c.prefix.as_str(), c.path_style),
            ("eu-west-1", "127.0.0.1_5000", false)
        );
        assert_eq!(c.access_key.as_deref(), Some("AK"));
        let no_bucket: HashMap<&str, String> = [("REGISTRY_STORAGE", "s3".to_string())].into();
        let e = check_env(&|k| no_bucket.get(k).cloned()).unwrap_err();
        assert!(e.to_string().contains("REGISTRY_STORAGE_S3_BUCKET"), "{e}");
    }

    #[test]
    fn upstream_options() {
        let env: HashMap<&str, String> = [
            ("REGCACHE_UPSTREAM_RESPONSE_TIMEOUT", "2s".to_string()),
            ("REGCACHE_BREAKER_FAILURES", "0".to_string()),
            ("REGCACHE_OFFLINE", "yes".to_string()),
        ]
        .into();
        let o = UpstreamOptions::from_env(&|k| env.get(k).cloned()).unwrap();
        assert_eq!(
            (o.response_timeout, o.breaker_failures, o.offline),
            (Duration::from_secs(2), 0, true)
        );
        for (var, value) in [
            ("REGCACHE_OFFLINE", "maybe"),
            ("REGCACHE_UPSTREAM_CONCURRENCY", "lots"),
            ("REGCACHE_UPSTREAM_CA_FILE", "/nonexistent.pem"),
        ] {
            let bad: HashMap<&str, String> = [(var, value.to_string())].into();
            let e = UpstreamOptions::from_env(&|k| bad.get(k).cloned()).unwrap_err();
            assert!(e.to_string().contains(var), "{e}");
        }
    }
}
