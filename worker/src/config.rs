//! The worker's settings, from its own environment (which the supervisor
//! built: the inherited environment plus this upstream's `variables`).

use std::path::PathBuf;
use std::time::Duration;

use crate::auth::{Credentials, Secret};

/// Everything a worker needs to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The registry API base, `https://host[:port]`.
    pub upstream: reqwest::Url,
    /// This upstream's cache root.
    pub storage: PathBuf,
    /// How long a tag -> digest answer is used before an upstream HEAD.
    pub tag_freshness: Duration,
    pub credentials: Option<Credentials>,
    /// How long shutdown waits for requests and fills in flight.
    pub drain_timeout: Duration,
    pub upstream_options: UpstreamOptions,
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
    pub extra_roots: Vec<reqwest::Certificate>,
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
                reqwest::Certificate::from_pem_bundle(&pem)
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
    #[error("REGISTRY_STORAGE={0} is not supported (yet): regcache stores on the filesystem")]
    Driver(String),
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
        Ok(Settings {
            upstream,
            storage,
            tag_freshness: duration_from(&env, "REGCACHE_TAG_FRESHNESS", DEFAULT_TAG_FRESHNESS)?,
            credentials: credentials_from(&env)?,
            drain_timeout: duration_from(&env, "REGISTRY_HTTP_DRAINTIMEOUT", DEFAULT_DRAIN)?,
            upstream_options: UpstreamOptions::from_env(&env)?,
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
    match env("REGISTRY_STORAGE").filter(|d| !d.is_empty() && d != "filesystem") {
        Some(driver) => Err(Error::Driver(driver)),
        None => Ok(()),
    }
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
        assert_eq!(s.tag_freshness, Duration::from_secs(300));
        assert_eq!(s.drain_timeout, DEFAULT_DRAIN);
        let s3: HashMap<&str, String> = [("REGISTRY_STORAGE", "s3".to_string())].into();
        let e = Settings::from_env("https://ghcr.io", "/c".into(), |k| s3.get(k).cloned());
        assert!(matches!(e, Err(Error::Driver(_))));
        assert!(Settings::from_env("not a url", "/c".into(), |_| None).is_err());
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
